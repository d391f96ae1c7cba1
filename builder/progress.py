"""Build progress for people and tools: a live terminal view, plain prefixed lines, quiet, or JSON events.

The solver reports events; a renderer decides how they look. Renderers are called from several
threads (stages build concurrently), so each one serializes its own output.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import threading
import time
import unicodedata
from collections import deque
from dataclasses import field
from typing import TYPE_CHECKING, TextIO

from parser.dataclass import dataclass

if TYPE_CHECKING:
    from cache.keys import MissCause

TAIL_LINES = 6
# What a terminal would act on instead of showing: escape sequences and other control characters.
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f]")


def fit(text: str, width: int) -> str:
    """``text`` as it can be drawn on one terminal row of ``width`` cells, never wrapping.

    The live view moves the cursor up by the rows it drew: a row that wrapped would leave its
    first part on the screen at every redraw. Tabs are expanded, control characters dropped, wide
    (East Asian) characters count as two cells, and the last cell stays empty.
    """
    text = _CONTROL.sub("", text.expandtabs(8))
    room = max(width - 1, 1)
    if len(text) <= room // 2:
        return text  # short enough whatever its characters
    out, used = [], 0
    for char in text:
        cells = _cells(char)
        if used + cells > room:
            break
        out.append(char)
        used += cells
    return "".join(out)


@dataclass
class StepView:
    """What the live view shows of one step: its title, state, time and last lines."""

    number: int
    name: str
    started: float
    finished: float | None = None
    state: str = "running"  # running | done | cached | would-run | error
    note: str = ""  # why it runs although the previous build had it cached
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    partial: bytes = b""


class Progress:
    """Collects step events; subclasses render them."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.lock = threading.Lock()
        self.steps: list[StepView] = []
        self.start = time.monotonic()

    def step_started(self, name: str) -> int:
        with self.lock:
            step = StepView(len(self.steps) + 1, name, time.monotonic())
            self.steps.append(step)
            self._started(step)
            return step.number

    def output(self, number: int, data: bytes) -> None:
        with self.lock:
            step = self.steps[number - 1]
            lines = (step.partial + data).split(b"\n")
            step.partial = lines.pop()
            for line in lines:
                text = line.decode("utf-8", "replace").rstrip("\r")
                step.tail.append(text)
                self._line(step, text)

    def step_finished(self, number: int, state: str = "done") -> None:
        with self.lock:
            step = self.steps[number - 1]
            if step.partial:
                text = step.partial.decode("utf-8", "replace")
                step.partial = b""
                step.tail.append(text)
                self._line(step, text)
            step.finished = time.monotonic()
            step.state = state
            self._finished(step)

    def message(self, text: str) -> None:
        with self.lock:
            self._message(text)

    def cache_miss(self, number: int, cause: MissCause) -> None:
        """A step runs that the previous build of the same target had cached, for ``cause``."""
        with self.lock:
            self._cache_miss(self.steps[number - 1], cause)

    def result(self, image_id: str, manifest_digest: str, names: tuple[str, ...]) -> None:
        with self.lock:
            self._result(image_id, manifest_digest, names)

    def close(self) -> None:
        with self.lock:
            self._close()

    def last_lines(self, number: int) -> list[str]:
        with self.lock:
            return list(self.steps[number - 1].tail)

    # Rendering hooks, called with the lock held.
    def _started(self, step: StepView) -> None: ...
    def _line(self, step: StepView, text: str) -> None: ...
    def _finished(self, step: StepView) -> None: ...
    def _message(self, text: str) -> None: ...
    def _cache_miss(self, step: StepView, cause: MissCause) -> None: ...
    def _result(self, image_id: str, manifest_digest: str, names: tuple[str, ...]) -> None: ...
    def _close(self) -> None: ...


class PlainProgress(Progress):
    """BuildKit's plain output: every line prefixed with its step number, so parallel stages stay readable."""

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def _started(self, step: StepView) -> None:
        self._write(f"#{step.number} {step.name}")

    def _line(self, step: StepView, text: str) -> None:
        self._write(f"#{step.number} {time.monotonic() - step.started:.3f} {text}")

    def _finished(self, step: StepView) -> None:
        if step.state == "cached":  # as BuildKit writes it
            self._write(f"#{step.number} CACHED")
            return
        if step.state == "would-run":
            self._write(f"#{step.number} WOULD RUN")
            return
        word = {"done": "DONE", "error": "ERROR"}[step.state]
        self._write(f"#{step.number} {word} {step.finished - step.started:.1f}s")

    def _cache_miss(self, step: StepView, cause: MissCause) -> None:
        self._write(f"#{step.number} cache miss: {cause.text}")

    def _message(self, text: str) -> None:
        self._write(text)

    def _result(self, image_id: str, manifest_digest: str, names: tuple[str, ...]) -> None:
        for name in names:
            self._write(f"naming to {name}")
        self._write(f"image {image_id} manifest {manifest_digest}")


class QuietProgress(Progress):
    """Only the image ID, on standard output, as ``docker build -q`` prints it."""

    def _result(self, image_id: str, manifest_digest: str, names: tuple[str, ...]) -> None:
        sys.stdout.write(image_id + "\n")
        sys.stdout.flush()


class JsonProgress(Progress):
    """One JSON object per line, for tools."""

    def _emit(self, **event: object) -> None:
        event = {"time": round(time.monotonic() - self.start, 6), **event}
        self.stream.write(json.dumps(event) + "\n")
        self.stream.flush()

    def _started(self, step: StepView) -> None:
        self._emit(event="step", step=step.number, name=step.name, status="started")

    def _line(self, step: StepView, text: str) -> None:
        self._emit(event="log", step=step.number, line=text)

    def _finished(self, step: StepView) -> None:
        self._emit(event="step", step=step.number, name=step.name, status=step.state,
                   seconds=round(step.finished - step.started, 6))

    def _message(self, text: str) -> None:
        self._emit(event="message", text=text)

    def _cache_miss(self, step: StepView, cause: MissCause) -> None:
        self._emit(event="cache", step=step.number, hit=False, cause=cause.kind, text=cause.text, **cause.details)

    def _result(self, image_id: str, manifest_digest: str, names: tuple[str, ...]) -> None:
        self._emit(event="result", image_id=image_id, manifest=manifest_digest, names=list(names))


_STATE_WORDS = {"running": "", "done": "DONE", "cached": "CACHED", "would-run": "WOULD RUN", "error": "ERROR"}


class TerminalProgress(Progress):
    """A live view: one line per step with its state and time, and the running steps' last output lines."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self.drawn = 0
        self.last_draw = 0.0
        self.done = threading.Event()
        self.ticker = threading.Thread(target=self._tick, daemon=True)
        self.ticker.start()

    def _tick(self) -> None:
        while not self.done.wait(0.1):
            with self.lock:
                self._draw()

    def _draw(self) -> None:
        width = shutil.get_terminal_size((100, 20)).columns
        now = time.monotonic()
        lines = [f"[+] Building {now - self.start:.1f}s"]
        for step in self.steps:
            seconds = (step.finished or now) - step.started
            state = _STATE_WORDS[step.state].rjust(9)
            tail = f"{seconds:5.1f}s{state}"
            head = fit(f" => {step.name}", width - len(tail) - 1)
            lines.append(fit(head + " " * (width - 1 - len(tail) - sum(map(_cells, head))) + tail, width))
            if step.note:
                lines.append(fit(f" => # cache miss: {step.note}", width))
            if step.state in ("running", "error"):
                lines.extend(fit(f" => > {text}", width) for text in step.tail)
        out = "\x1b[1A\x1b[2K" * self.drawn + "\r" + "\n".join(line + "\x1b[K" for line in lines) + "\n"
        self.stream.write(out if self.drawn else out.replace("\r", "", 1))
        self.stream.flush()
        self.drawn = len(lines)
        self.last_draw = now

    def _started(self, step: StepView) -> None:
        self._draw()

    def _cache_miss(self, step: StepView, cause: MissCause) -> None:
        step.note = cause.text
        self._draw()

    def _finished(self, step: StepView) -> None:
        self._draw()

    def _message(self, text: str) -> None:
        self._draw()
        self.stream.write(text + "\n")
        self.drawn = 0

    def _result(self, image_id: str, manifest_digest: str, names: tuple[str, ...]) -> None:
        self._draw()
        self.drawn = 0
        for name in names:
            self.stream.write(f" => naming to {name}\n")
        line = f" => image {image_id} manifest {manifest_digest}"
        if len(line) >= shutil.get_terminal_size((100, 20)).columns:
            line = f" => image {image_id}\n => manifest {manifest_digest}"  # whole digests, each on its own row
        self.stream.write(line + "\n")
        self.stream.flush()

    def _close(self) -> None:
        self.done.set()
        if self.drawn:
            self._draw()


def _cells(char: str) -> int:
    """The terminal cells a character takes: two when wide (East Asian), none when it combines with the last."""
    return 2 if unicodedata.east_asian_width(char) in "WF" else 0 if unicodedata.combining(char) else 1


def size_text(size: float, separator: str = " ") -> str:
    """A byte count as people read it, in powers of 1000 as docker shows sizes: ``1.1 MB``, ``724 B``."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f}{separator}{unit}" if unit == "B" else f"{size:.1f}{separator}{unit}"
        size /= 1000
    raise AssertionError("unreachable")


def make_progress(mode: str) -> Progress:
    """``auto`` picks the live view on a terminal and plain lines otherwise, as docker build does."""
    if mode == "auto":
        mode = "tty" if sys.stderr.isatty() else "plain"
    # silent: nothing at all (a build pybuild makes for its own checks, beside one that shows progress)
    return {"tty": TerminalProgress, "plain": PlainProgress, "quiet": QuietProgress, "json": JsonProgress,
            "silent": Progress}[mode]()
