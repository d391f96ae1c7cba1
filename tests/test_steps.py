"""Metadata instructions edit the image config as docker does; run without root or a sandbox."""

from __future__ import annotations

import pytest

from builder.oci.image import Healthcheck, config_json
from builder.steps import STEPS, FilesystemStep, StageState, StepInputs, go_duration, scratch_state
from parser import parse


def apply(text: str, state: StageState | None = None, **context) -> StageState:
    """The stage after ``text``'s instructions; a filesystem change is the solver's, tested end to end."""
    inputs = StepInputs(**context)
    state = state or scratch_state("1970-01-01T00:00:00Z")
    for instruction in parse(text).instructions[1:]:  # after the FROM
        outcome = STEPS[type(instruction)](inputs, state, instruction)
        state = outcome.state if isinstance(outcome, FilesystemStep) else outcome
    return state


PATH = ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")

CONFIG_CASES = [
    ("ENV sets and keeps order", "ENV A=1 B=2\nENV A=3\n", "env", (PATH, ("A", "3"), ("B", "2"))),
    ("ENV expands earlier ENV", "ENV A=x\nENV B=${A}y\n", "env", (PATH, ("A", "x"), ("B", "xy"))),
    ("ARG is not in the config", "ARG A=1\nENV B=$A\n", "env", (PATH, ("B", "1"))),
    ("ENV wins over ARG", "ARG A=arg\nENV A=env\nENV B=$A\n", "env", (PATH, ("A", "env"), ("B", "env"))),
    ("LABEL sorted, last wins", "LABEL b=2 a=1\nLABEL b=3\n", "labels", (("a", "1"), ("b", "3"))),
    ("EXPOSE normalizes", "EXPOSE 80 53/udp 8000-8002/TCP\n", "exposed_ports",
     ("80/tcp", "53/udp", "8000/tcp", "8001/tcp", "8002/tcp")),
    ("VOLUME", "VOLUME /data /logs /data\n", "volumes", ("/data", "/logs")),
    ("VOLUME json", 'VOLUME ["/logs", "/data"]\n', "volumes", ("/logs", "/data")),
    ("USER", "ARG U=www\nUSER $U:staff\n", "user", "www:staff"),
    ("WORKDIR is relative to the previous one", "ENV D=/srv\nWORKDIR $D\nWORKDIR app/../web\n", "working_dir",
     "/srv/web"),
    ("CMD shell form", "CMD echo hi\n", "cmd", ("/bin/sh", "-c", "echo hi")),
    ("CMD exec form", 'CMD ["echo", "hi"]\n', "cmd", ("echo", "hi")),
    ("SHELL changes shell form", 'SHELL ["/bin/bash", "-xc"]\nCMD echo\n', "cmd", ("/bin/bash", "-xc", "echo")),
    ("ENTRYPOINT after CMD in the stage keeps CMD", 'CMD ["a"]\nENTRYPOINT ["b"]\n', "cmd", ("a",)),
    ("STOPSIGNAL", "STOPSIGNAL SIGTERM\n", "stop_signal", "SIGTERM"),
    ("HEALTHCHECK shell", "HEALTHCHECK --interval=5s --retries=2 CMD wget -q localhost\n", "healthcheck",
     Healthcheck(test=("CMD-SHELL", "wget -q localhost"), interval=5_000_000_000, retries=2)),
    ("HEALTHCHECK exec", 'HEALTHCHECK CMD ["true"]\n', "healthcheck", Healthcheck(test=("CMD", "true"))),
    ("HEALTHCHECK NONE", "HEALTHCHECK NONE\n", "healthcheck", Healthcheck(test=("NONE",))),
    ("ONBUILD keeps the expression", "ONBUILD RUN echo $X\n", "on_build", ("RUN echo $X",)),
]


@pytest.mark.parametrize(("name", "text", "attribute", "expected"), CONFIG_CASES,
                         ids=[case[0] for case in CONFIG_CASES])
def test_config(name: str, text: str, attribute: str, expected: object) -> None:
    state = apply("FROM scratch\n" + text)
    assert getattr(state.image.config, attribute) == expected


def test_entrypoint_drops_inherited_cmd() -> None:
    base = apply('FROM scratch\nCMD ["sh"]\n')
    child = apply('FROM scratch\nENTRYPOINT ["httpd"]\n', StageState(image=base.image))
    assert child.image.config.entrypoint == ("httpd",)
    assert child.image.config.cmd is None


def test_build_args_override_defaults_and_globals() -> None:
    state = apply("FROM scratch\nARG A=default\nARG G\nARG B\nENV X=$A-$G-${B:-unset}\n",
                  build_args={"A": "given"}, global_args={"G": "global"})
    assert dict(state.image.config.env)["X"] == "given-global-unset"


def test_metadata_steps_add_empty_history() -> None:
    state = apply("FROM scratch\nENV A=1\nLABEL a=b\nEXPOSE 80\nUSER www\nMAINTAINER me <me@x>\n")
    assert [(entry.created_by, entry.empty_layer) for entry in state.image.history] == [
        ("ENV A=1", True), ("LABEL a=b", True), ("EXPOSE [80/tcp]", True), ("USER www", True),
        ("MAINTAINER me <me@x>", True)]
    assert state.image.author == "me <me@x>"


def test_config_json_is_deterministic_and_complete() -> None:
    state = apply('FROM scratch\nENV A=1\nLABEL l=v\nEXPOSE 80\nVOLUME /d\nWORKDIR /w\nUSER u\n'
                  'ENTRYPOINT ["e"]\nCMD ["c"]\nSTOPSIGNAL SIGINT\nHEALTHCHECK CMD true\n')
    text = config_json(state.image)
    assert text == config_json(state.image)
    assert text.startswith(b'{"created":"1970-01-01T00:00:00Z","architecture":')
    assert (b'"config":{"User":"u","ExposedPorts":{"80/tcp":{}},"Env":["PATH=/usr/local/sbin:/usr/local/bin:'
            b'/usr/sbin:/usr/bin:/sbin:/bin","A=1"],"Entrypoint":["e"],"Cmd":["c"],"Volumes":{"/d":{}},'
            b'"WorkingDir":"/w","Labels":{"l":"v"},"StopSignal":"SIGINT","Healthcheck":{"Test":["CMD-SHELL",'
            b'"true"]}}') in text


# What BuildKit's dockerfile2llb writes as each entry's created_by: CMD and ENTRYPOINT with Go's %q of the
# argv, SHELL and VOLUME with %v, EXPOSE with %v of the normalized ports, HEALTHCHECK with %+v of its config.
HISTORY_CASES = [
    ("CMD exec", 'CMD ["mitmproxy"]\n', 'CMD ["mitmproxy"]'),
    ("CMD shell", "CMD echo hi\n", 'CMD ["/bin/sh" "-c" "echo hi"]'),
    ("CMD quoting", 'CMD ["say \\"hi\\"", "a\\\\b", "tab\\there", "\\u0001", "\\u00e9t\\u00e9", "\\u0085"]\n',
     'CMD ["say \\"hi\\"" "a\\\\b" "tab\\there" "\\x01" "\u00e9t\u00e9" "\\u0085"]'),
    ("CMD empty", "CMD []\n", "CMD []"),
    ("ENTRYPOINT exec", 'ENTRYPOINT ["/bin/app", "--port", "80"]\n', 'ENTRYPOINT ["/bin/app" "--port" "80"]'),
    ("ENTRYPOINT after SHELL", 'SHELL ["/bin/bash", "-xc"]\nENTRYPOINT exec app\n',
     'ENTRYPOINT ["/bin/bash" "-xc" "exec app"]'),
    ("SHELL", 'SHELL ["/bin/bash", "-o", "pipefail", "-c"]\n', "SHELL [/bin/bash -o pipefail -c]"),
    ("VOLUME json", 'VOLUME ["/data"]\n', "VOLUME [/data]"),
    ("VOLUME only this instruction's, expanded", "ENV D=/logs\nVOLUME /data\nVOLUME $D /data\n",
     "VOLUME [/logs /data]"),
    ("EXPOSE normalized", "EXPOSE 80 53/UDP 8000-8001\n", "EXPOSE [80/tcp 53/udp 8000/tcp 8001/tcp]"),
    ("HEALTHCHECK shell", "HEALTHCHECK --interval=1m30s --timeout=500ms --start-period=1h --retries=3 CMD curl -f x\n",
     "HEALTHCHECK {Test:[CMD-SHELL curl -f x] Interval:1m30s Timeout:500ms StartPeriod:1h0m0s StartInterval:0s "
     "Retries:3}"),
    ("HEALTHCHECK exec", 'HEALTHCHECK --start-interval=1.5s CMD ["true"]\n',
     "HEALTHCHECK {Test:[CMD true] Interval:0s Timeout:0s StartPeriod:0s StartInterval:1.5s Retries:0}"),
    ("HEALTHCHECK NONE", "HEALTHCHECK NONE\n",
     "HEALTHCHECK {Test:[NONE] Interval:0s Timeout:0s StartPeriod:0s StartInterval:0s Retries:0}"),
    ("STOPSIGNAL", "STOPSIGNAL SIGKILL\n", "STOPSIGNAL SIGKILL"),
    ("ARG with and without a value", "ARG A=1 B\n", "ARG A=1 B"),
    ("ARG default expanded", "ENV V=2\nARG A=v$V\n", "ARG A=v2"),
]


@pytest.mark.parametrize(("name", "text", "created_by"), HISTORY_CASES, ids=[case[0] for case in HISTORY_CASES])
def test_history_text(name: str, text: str, created_by: str) -> None:
    state = apply("FROM scratch\n" + text)
    assert state.image.history[-1].created_by == created_by


def test_history_takes_build_arg_values_and_onbuild_adds_none() -> None:
    state = apply("FROM scratch\nARG A=default G\nONBUILD RUN true\n", build_args={"A": "given"},
                  global_args={"G": "global"})
    assert [entry.created_by for entry in state.image.history] == ["ARG A=given G=global"]
    assert state.image.config.on_build == ("RUN true",)


@pytest.mark.parametrize(("nanoseconds", "text"), [
    (0, "0s"), (1, "1ns"), (1_500, "1.5µs"), (2_000_000, "2ms"), (999_999_999, "999.999999ms"),
    (10**9, "1s"), (61 * 10**9 + 5 * 10**8, "1m1.5s"), (3600 * 10**9, "1h0m0s"), (-90 * 10**9, "-1m30s"),
])
def test_go_duration(nanoseconds: int, text: str) -> None:
    assert go_duration(nanoseconds) == text


@pytest.mark.parametrize(("text", "message"), [
    ("EXPOSE 80/xyz\n", "invalid port '80/xyz'"),
    ("EXPOSE 0\n", "invalid port range '0'"),
    ("STOPSIGNAL 'bad sig'\n", "invalid signal"),
])
def test_metadata_errors(text: str, message: str) -> None:
    with pytest.raises(Exception, match=message):
        apply("FROM scratch\n" + text)
