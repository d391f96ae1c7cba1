"""Progress renderers: plain prefixed lines, JSON events, quiet, and the live terminal view."""

from __future__ import annotations

import io
import json
import re

import pytest

from builder.progress import JsonProgress, PlainProgress, QuietProgress, TerminalProgress


def drive(progress) -> None:
    first = progress.step_started("[stage-0 1/2] FROM base")
    progress.step_finished(first)
    second = progress.step_started("[stage-0 2/2] RUN make")
    progress.output(second, b"compiling\nlinking")
    progress.output(second, b" done\n")
    progress.step_finished(second, "error")
    progress.result("sha256:id", "sha256:manifest", ("app:1",))
    progress.close()


def test_plain_lines_are_prefixed_by_step() -> None:
    stream = io.StringIO()
    drive(PlainProgress(stream))
    lines = [re.sub(r"\d+\.\d+", "T", line) for line in stream.getvalue().splitlines()]
    assert lines == ["#1 [stage-0 1/2] FROM base", "#1 DONE Ts", "#2 [stage-0 2/2] RUN make", "#2 T compiling",
                     "#2 T linking done", "#2 ERROR Ts", "naming to app:1", "image sha256:id manifest sha256:manifest"]


def test_json_events() -> None:
    stream = io.StringIO()
    drive(JsonProgress(stream))
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(event["event"], event.get("status") or event.get("line") or event.get("image_id"))
            for event in events] == [("step", "started"), ("step", "done"), ("step", "started"),
                                     ("log", "compiling"), ("log", "linking done"), ("step", "error"),
                                     ("result", "sha256:id")]


def test_quiet_prints_only_the_image_id(capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    drive(QuietProgress(stream))
    assert stream.getvalue() == ""
    assert capsys.readouterr().out == "sha256:id\n"


def test_terminal_view_shows_states_and_the_last_output_lines() -> None:
    stream = io.StringIO()
    progress = TerminalProgress(stream)
    number = progress.step_started("[stage-0 1/1] RUN make")
    progress.output(number, b"".join(b"line %d\n" % i for i in range(10)))
    with progress.lock:
        progress._draw()
    running = stream.getvalue()
    assert " => > line 9" in running and " => > line 4" in running and " => > line 3" not in running
    progress.step_finished(number)
    progress.result("sha256:id", "sha256:m", ())
    progress.close()
    assert "DONE" in stream.getvalue().splitlines()[-2]
    assert stream.getvalue().splitlines()[-1] == " => image sha256:id manifest sha256:m"


@pytest.mark.parametrize(("text", "width", "expected"), [
    ("short", 80, "short"),
    ("x" * 100, 40, "x" * 39),  # the last cell stays empty: the cursor never wraps
    ("a\tb", 80, "a       b"),  # a tab takes the cells it will take on the screen
    ("\x1b[31mred\x1b[0m done\r", 80, "red done"),  # a step's colours and carriage returns are not drawn
    ("日本語のテキスト" * 3, 11, "日本語のテ"),  # wide characters take two cells
])
def test_fit_keeps_a_row_within_the_terminal(text: str, width: int, expected: str) -> None:
    from builder.progress import fit

    assert fit(text, width) == expected


def test_terminal_view_never_draws_a_row_wider_than_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setattr("shutil.get_terminal_size", lambda fallback=(80, 24): os.terminal_size((40, 24)))
    stream = io.StringIO()
    progress = TerminalProgress(stream)
    number = progress.step_started("[stage-0 1/1] RUN " + "a-very-long-command " * 5)
    progress.output(number, b"\tindented output that goes on and on past forty columns\n")
    with progress.lock:
        progress._draw()
    progress.step_finished(number)
    progress.result("sha256:" + "1" * 64, "sha256:" + "2" * 64, ())
    progress.close()
    rows = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stream.getvalue()).replace("\r", "").splitlines()
    live = [row for row in rows if not row.startswith((" => image", " => manifest"))]
    assert live and all(len(row) < 40 for row in live), live
    assert rows[-2:] == [" => image sha256:" + "1" * 64, " => manifest sha256:" + "2" * 64]


@pytest.mark.parametrize("make", [PlainProgress, JsonProgress, TerminalProgress])
def test_every_view_shows_a_cached_step_and_a_miss_with_its_cause(make) -> None:
    from cache.keys import MissCause

    stream = io.StringIO()
    progress = make(stream)
    hit = progress.step_started("[stage-0 2/3] COPY a /a")
    progress.step_finished(hit, "cached")
    miss = progress.step_started("[stage-0 3/3] RUN make")
    progress.cache_miss(miss, MissCause("file", "file a changed", {"path": "a"}))
    progress.step_finished(miss)
    progress.close()
    text = stream.getvalue()
    if make is PlainProgress:
        assert text.splitlines()[:4] == ["#1 [stage-0 2/3] COPY a /a", "#1 CACHED", "#2 [stage-0 3/3] RUN make",
                                         "#2 cache miss: file a changed"]
    elif make is JsonProgress:
        events = [json.loads(line) for line in text.splitlines()]
        assert events[1]["status"] == "cached"
        assert {key: events[3][key] for key in ("event", "step", "hit", "cause", "text", "path")} == {
            "event": "cache", "step": 2, "hit": False, "cause": "file", "text": "file a changed", "path": "a"}
    else:
        assert "CACHED" in text and " => # cache miss: file a changed" in text
