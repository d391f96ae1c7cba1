"""The `pybuild` command, run for real in a subprocess: output, error format, exit codes, and never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

_SCRIPT = Path(sys.executable).with_name("pybuild")
PYBUILD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "builder"]


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str


def run(*args: str, cwd: Path, stdin: bytes = b"") -> Result:
    env = {**os.environ, "PYBUILD_ROOT": str(cwd / ".pybuild-store")}
    done = subprocess.run([*PYBUILD, *args], cwd=cwd, input=stdin, capture_output=True, timeout=60, env=env)
    result = Result(done.returncode, done.stdout.decode("utf-8"), done.stderr.decode("utf-8"))
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path


def write(directory: Path, name: str, text: str | bytes) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


# --- debug ast prints BuildKit's dump -------------------------------------------------------------------------------
# (id, Dockerfile, expected stdout)
DUMPS = [
    ("simple", "FROM alpine AS build\nRUN echo hi\n", '(from "alpine" "AS" "build")\n(run "echo hi")\n'),
    (
        "flags and JSON",
        'FROM a\nCOPY --from=build --chown=1:1 /out /app\nCMD ["/app", "--port", "80"]\n',
        '(from "a")\n(copy ["--from=build" "--chown=1:1"] "/out" "/app")\n(cmd "/app" "--port" "80")\n',
    ),
    (
        "heredoc bodies are not dumped",
        "FROM a\nRUN --mount=type=cache,target=/foo <<MOUNT\necho hello\nMOUNT\n",
        '(from "a")\n(run ["--mount=type=cache,target=/foo"] "<<MOUNT")\n',
    ),
    ("ENV triples", "FROM a\nENV A=1 B=2\n", '(from "a")\n(env "A" "1" "=" "B" "2" "=")\n'),
    ("ENV legacy", "FROM a\nENV A 1 2\n", '(from "a")\n(env "A" "1 2" "")\n'),
    ("ONBUILD", "FROM a\nONBUILD RUN make\n", '(from "a")\n(onbuild (run "make"))\n'),
    # The raw dump does not check instructions: an unknown keyword is `(keyword "")`, as in BuildKit.
    ("unknown instruction", "FROM a\nRUNN make\n", '(from "a")\n(runn "")\n'),
    ("CRLF", "FROM a\r\nRUN a \\\r\n  b\r\n", '(from "a")\n(run "a   b")\n'),
    ("Unicode kept, controls quoted", 'FROM a\nCMD ["♥", "\\u0000\\t"]\n', '(from "a")\n(cmd "♥" "\\x00\\t")\n'),
    ("escape directive", "# escape=`\nFROM a\nRUN dir `\n  c:\\\n", '(from "a")\n(run "dir   c:\\\\")\n'),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in DUMPS], ids=[c[0] for c in DUMPS])
def test_debug_ast_prints_the_dump(work: Path, text: str, expected: str) -> None:
    write(work, "Dockerfile.test", text)
    result = run("debug", "ast", "-f", "Dockerfile.test", cwd=work)
    assert (result.code, result.stdout, result.stderr) == (0, expected, "")


def test_debug_ast_reads_stdin(work: Path) -> None:
    result = run("debug", "ast", "-f", "-", cwd=work, stdin=b"FROM a\nRUN <<EOF\nx\nEOF\nUSER app\n")
    assert (result.code, result.stdout, result.stderr) == (0, '(from "a")\n(run "<<EOF")\n(user "app")\n', "")


def test_debug_ast_default_is_the_dockerfile_here(work: Path) -> None:
    write(work, "Dockerfile", "FROM scratch\n")
    assert run("debug", "ast", cwd=work) == Result(0, '(from "scratch")\n', "")


def test_debug_ast_undecodable_bytes(work: Path) -> None:
    write(work, "Dockerfile", b"FROM a\nRUN echo \xff\n")
    assert run("debug", "ast", cwd=work) == Result(0, '(from "a")\n(run "echo \\xff")\n', "")


def test_debug_ast_warnings_go_to_stderr(work: Path) -> None:
    write(work, "Dockerfile", "FROM a\nRUN a \\\n\n  b\n")
    result = run("debug", "ast", cwd=work)
    assert result.code == 0
    assert result.stdout == '(from "a")\n(run "a   b")\n'
    assert result.stderr == "Dockerfile:2: warning: Empty continuation line found in: RUN a   b\n"


# --- errors: FILE:LINE:COL: message, the line, a caret, a hint; exit 1 ----------------------------------------------
@dataclass(frozen=True)
class CliError:
    id: str
    args: tuple[str, ...]  # {f} is the Dockerfile's path
    text: str
    stderr: str


ERRORS = [
    CliError(
        "debug ast: unterminated heredoc",
        ("debug", "ast", "-f", "{f}"),
        "FROM a\nRUN <<EOF\necho hi\n",
        "{f}:2:5: unterminated heredoc: no line 'EOF' before the end of the file\n"
        "  RUN <<EOF\n"
        "      ^\n"
        "hint: end the heredoc with a line holding only EOF\n",
    ),
    CliError(
        "debug ast: JSON that is not strings",
        ("debug", "ast", "-f", "{f}"),
        'FROM a\nCMD [ "echo", [ "nested json" ] ]\n',
        "{f}:2:5: when using JSON array syntax, arrays must be comprised of strings only\n"
        '  CMD [ "echo", [ "nested json" ] ]\n'
        "      ^\n",
    ),
    CliError(
        "debug ast: no instructions",
        ("debug", "ast", "-f", "{f}"),
        "# nothing\n",
        "{f}:1:1: file with no instructions\n",
    ),
    CliError(
        "build: unknown instruction",
        ("build", "-f", "{f}", "."),
        "FROM a\nRUNN make\n",
        "{f}:2:1: unknown instruction: RUNN\n  RUNN make\n  ^\nhint: did you mean RUN?\n",
    ),
    CliError(
        "build: unknown flag on a tab-indented line",
        ("build", "-f", "{f}", "."),
        "FROM a\n\tCOPY --chwon=1 a b\n",
        "{f}:2:7: unknown flag: --chwon\n   COPY --chwon=1 a b\n        ^\nhint: did you mean --chown?\n",
    ),
    CliError(
        "build: error on a continuation line",
        ("build", "-f", "{f}", "."),
        "FROM a\nRUN --network=none \\\n    --network=host make\n",
        "{f}:3:5: duplicate flag specified: --network\n      --network=host make\n      ^\n",
    ),
    CliError(
        "build: directive after an instruction",
        ("build", "-f", "{f}", "."),
        "FROM a\n# syntax=docker/dockerfile:1\n",
        "{f}:2:1: parser directive 'syntax' must come before the first instruction\n"
        "  # syntax=docker/dockerfile:1\n"
        "  ^\n"
        "hint: move it to the top of the file; here it would only be a comment\n",
    ),
    CliError(
        "build: another frontend",
        ("build", "-f", "{f}", "."),
        "# syntax=example.com/frontend\nFROM a\n",
        "{f}:1:1: unsupported frontend 'example.com/frontend': pybuild implements the docker/dockerfile syntax only\n"
        "  # syntax=example.com/frontend\n"
        "  ^\n"
        "hint: remove the # syntax line or point it at docker/dockerfile:1\n",
    ),
    CliError(
        "PATH alone means build PATH",
        ("ctx",),
        "FROM a\nCOPY onlyone\n",
        "ctx/Dockerfile:2:1: COPY requires at least two arguments, but only 1 provided\n"
        "  COPY onlyone\n"
        "  ^\n"
        "hint: COPY <src>... <dest>\n",
    ),
]


@pytest.mark.parametrize("case", ERRORS, ids=[c.id for c in ERRORS])
def test_errors(work: Path, case: CliError) -> None:
    name = "ctx/Dockerfile" if case.args == ("ctx",) else "sub/Dockerfile.bad"
    write(work, name, case.text)
    (work / "ctx").mkdir(exist_ok=True)
    result = run(*(a.format(f=name) for a in case.args), cwd=work)
    assert result.code == 1
    assert result.stdout == ""
    assert result.stderr == case.stderr.format(f=name)


def test_error_from_stdin_is_named_stdin(work: Path) -> None:
    result = run("build", "-f", "-", ".", cwd=work, stdin=b"FROM a\nHEALTHCHECK --retries=-1 CMD true\n")
    assert result.code == 1
    assert result.stderr.splitlines() == [
        "<stdin>:2:13: --retries cannot be negative (-1)",
        "  HEALTHCHECK --retries=-1 CMD true",
        "              ^",
    ]


def test_build_of_a_missing_base_names_the_image(work: Path) -> None:
    # a registry on loopback that is not there: the pull is tried and fails without leaving the machine
    write(work, "app/Dockerfile", "FROM localhost:9/a\nRUN make\nCMD run\n")
    for args in (("build", "app"), ("app",), ("build", "-f", "app/Dockerfile", "app"), ("-f", "app/Dockerfile", "app")):
        result = run(*args, cwd=work, stdin=b"")
        assert result.code == 1, args
        assert result.stdout == ""
        assert ("app/Dockerfile:1:1: image 'localhost:9/a' is not in the local store, and pulling it failed: "
                "cannot reach registry localhost:9") in result.stderr, args
        assert "  FROM localhost:9/a\n" in result.stderr


def test_build_shows_parse_warnings(work: Path) -> None:
    write(work, "Dockerfile", "# licence header\n# syntax=docker/dockerfile:1\nFROM a\n")
    result = run(".", cwd=work)
    assert result.code == 1
    assert result.stderr.splitlines()[0] == (
        "Dockerfile:2: warning: '# syntax=' after a comment or blank line is a comment, not a directive"
    )


# --- a missing or unreadable Dockerfile: one error line (and a hint), no traceback ----------------------------------
# (id, args, expected stderr)
MISSING = [
    (
        "debug ast -f",
        ("debug", "ast", "-f", "nope/Dockerfile"),
        "pybuild: error: cannot read Dockerfile: nope/Dockerfile does not exist\n",  # -f was given: no hint
    ),
    (
        "build -f",
        ("build", "-f", "nope.Dockerfile", "empty"),
        "pybuild: error: cannot read Dockerfile: nope.Dockerfile does not exist\n",
    ),
    (
        "debug ast default",
        ("debug", "ast"),
        "pybuild: error: cannot read Dockerfile: Dockerfile does not exist\nhint: pass its path with -f\n",
    ),
    (
        "build context without Dockerfile",
        ("build", "empty"),
        "pybuild: error: cannot read Dockerfile: empty/Dockerfile does not exist\nhint: pass its path with -f\n",
    ),
    (
        "PATH without Dockerfile",
        ("empty",),
        "pybuild: error: cannot read Dockerfile: empty/Dockerfile does not exist\nhint: pass its path with -f\n",
    ),
    (
        "PATH that does not exist",
        ("missing-dir",),
        "pybuild: error: build context missing-dir does not exist\n",
    ),
    ("-f is a directory", ("debug", "ast", "-f", "empty"),
     "pybuild: error: cannot read Dockerfile empty: Is a directory\n"),
]


@pytest.mark.parametrize(("args", "stderr"), [c[1:] for c in MISSING], ids=[c[0] for c in MISSING])
def test_missing_dockerfile(work: Path, args: tuple[str, ...], stderr: str) -> None:
    (work / "empty").mkdir()
    result = run(*args, cwd=work)
    assert (result.code, result.stdout, result.stderr) == (1, "", stderr)
    assert result.stderr.startswith(("pybuild: error: cannot read Dockerfile", "pybuild: error: build context"))


# --- the command line itself ----------------------------------------------------------------------------------------
def test_version(work: Path) -> None:
    assert run("--version", cwd=work) == Result(0, "pybuild, version 0.1.0\n", "")


def test_help_lists_the_commands(work: Path) -> None:
    result = run("--help", cwd=work)
    assert result.code == 0
    assert "build" in result.stdout and "debug" in result.stdout
    assert run("-h", cwd=work).stdout == result.stdout


def test_unknown_option_is_a_usage_error(work: Path) -> None:
    result = run("debug", "ast", "--bogus", cwd=work)
    assert result.code == 2
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == "Error: No such option '--bogus'."


@pytest.mark.parametrize(
    ("statement", "loads_grammar"),
    [
        # what `pybuild images`, `rmi`, `inspect`, `save` and `load` import: no Dockerfile, no grammar library
        ("import builder.oci.store", False),
        ("import builder.oci.exporter", False),
        ("import builder.solver, builder.fs.snapshot, builder.sandbox.namespace", False),
        ("import builder.build, parser.instructions", False),
        # parsing does load it
        ("from parser.instructions import parse; parse(b'FROM scratch\\n')", True),
    ],
)
def test_grammar_library_loads_only_to_parse(statement: str, loads_grammar: bool) -> None:
    code = f"import sys; {statement}; print('lark' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(loads_grammar)


# --- the collector: off while the program loads, back on for the command's own work ----------------------------------
COLLECTOR = """
import gc, os, sys
import builder.__main__ as entry
real_exit = os._exit
def exit_telling(code):
    print("collector", gc.isenabled(), gc.get_freeze_count(), flush=True)
    real_exit(code)
os._exit = exit_telling
sys.argv = ["pybuild", *sys.argv[1:]]
entry.main()
"""


@pytest.mark.parametrize("args", [("images",), ("build", "--progress=plain", ".")])
def test_the_collector_comes_back_once_a_command_has_loaded(work: Path, args: tuple[str, ...]) -> None:
    """Start-up runs without the cyclic collector (builder.__main__); each command turns it back on, with
    what start-up made frozen, so a long build still frees its cyclic garbage."""
    write(work, "Dockerfile", "FROM scratch\nCOPY hello /\n")
    write(work, "hello", "hello\n")
    environment = {**os.environ, "PYBUILD_ROOT": str(work / "store")}
    done = subprocess.run([sys.executable, "-c", COLLECTOR, *args], cwd=work, capture_output=True, text=True,
                          env=environment, timeout=60)
    assert done.returncode == 0, done.stderr
    _, enabled, frozen = done.stdout.splitlines()[-1].split()
    assert enabled == "True"
    assert int(frozen) > 10_000  # modules, classes, click's commands: never walked again


# --- the boundary: whatever goes wrong is one line, the traceback only when asked for -------------------------------
UNFORESEEN = """
import sys
import builder.cli as cli
def images(*args, **kwargs):
    raise ValueError("a bug")
cli.images.callback = images
cli.main(sys.argv[1:])
"""


@pytest.mark.parametrize(("args", "env", "traceback"), [
    (("images",), {}, False),
    (("--debug", "images"), {}, True),
    (("images",), {"PYBUILD_DEBUG": "1"}, True),
])
def test_an_unforeseen_error_is_one_line_unless_debugging(work: Path, args, env, traceback: bool) -> None:
    environment = {**os.environ, "PYBUILD_ROOT": str(work / "store"), **env}
    environment.pop("PYBUILD_DEBUG", None) if not env else None
    done = subprocess.run([sys.executable, "-c", UNFORESEEN, *args], capture_output=True, text=True, env=environment)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert ("Traceback (most recent call last):" in lines) == traceback, done.stderr
    assert "pybuild: error: internal error: ValueError: a bug" in lines
    if not traceback:
        assert lines == ["pybuild: error: internal error: ValueError: a bug",
                         "hint: run again with --debug (or PYBUILD_DEBUG=1) to see where, and report it"]


def test_debug_before_a_path_still_builds_by_default(work: Path) -> None:
    done = run("--debug", "missing-dir", cwd=work)
    assert (done.code, done.stderr) == (1, "pybuild: error: build context missing-dir does not exist\n")


@pytest.mark.parametrize(("error", "written", "expected"), [
    (OSError(28, "No space left on device"), None, "error: no space left on the device"),
    (OSError(28, "No space left on device", "/store/blobs/x"), None,
     "error: no space left on the device for /store/blobs/x"),
    (PermissionError(13, "Permission denied", "/srv/out"), None, "error: /srv/out: Permission denied"),
    (OSError(30, "Read-only file system", "/ro/x"), None, "error: /ro/x: Read-only file system"),
    (FileNotFoundError(2, "No such file or directory", "newuidmap"), None,
     "error: newuidmap: command not found\nhint: install newuidmap"),
    (OSError(5, "Input/output error", "/dev/sdz"), None, "error: /dev/sdz: Input/output error"),
    (OSError(5, "Input/output error"), None, "error: Input/output error"),
])
def test_os_errors_name_what_failed(error: OSError, written, expected: str) -> None:
    from builder.cli import os_error

    rendered = os_error(error, written).render()
    assert rendered == expected or rendered.startswith(expected + "\nhint: "), rendered


def test_images_says_which_size_it_shows(work: Path) -> None:
    done = run("images", cwd=work)
    assert (done.code, done.stdout) == (0, "REPOSITORY   TAG   IMAGE ID   COMPRESSED SIZE\n")


# --- where the store lives: chosen by the CLI, before any namespace ---------------------------------------------------
@pytest.mark.parametrize(("env", "euid", "expected"), [
    ({"PYBUILD_ROOT": "/srv/pb"}, 0, "/srv/pb"),
    ({}, 0, "/var/lib/pybuild"),
    ({"XDG_DATA_HOME": "/data"}, 1000, "/data/pybuild"),
    ({"HOME": "/home/u"}, 1000, "/home/u/.local/share/pybuild"),
])
def test_default_store_root(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], euid: int, expected: str) -> None:
    for name in ("PYBUILD_ROOT", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    from builder.cli import default_store_root

    assert default_store_root() == Path(expected)
