"""With GITHUB_ACTIONS=true an error is also a GitHub workflow command, so the pull request shows it on the line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from e2e import PYBUILD, run

from builder.cli import github_annotation
from parser.errors import PybuildError, SourceRange

CASES = [
    # (error, workspace, annotation)
    (PybuildError("unknown instruction: FROOM", SourceRange("/repo/app/Dockerfile", 3, 3, 1),
                  hint="did you mean FROM?"),
     "/repo", "::error file=app/Dockerfile,line=3,endLine=3,col=1,title=pybuild::unknown instruction: FROOM%0A"
              "hint: did you mean FROM?"),
    (PybuildError("RUN failed with exit code 2\ncommand: /bin/sh -c make, 100% done",
                  SourceRange("/repo/Dockerfile", 4, 6, 1)),
     "/repo/", "::error file=Dockerfile,line=4,endLine=6,col=1,title=pybuild::RUN failed with exit code 2%0A"
               "command: /bin/sh -c make, 100%25 done"),
    (PybuildError("x", SourceRange("/elsewhere/a:b,c/Dockerfile", 1, 1, 5)), "/repo",
     "::error file=/elsewhere/a%3Ab%2Cc/Dockerfile,line=1,endLine=1,col=5,title=pybuild::x"),
    (PybuildError("cannot reach registry r.example: refused"), None,
     "::error title=pybuild::cannot reach registry r.example: refused"),
]


@pytest.mark.parametrize(("error", "workspace", "annotation"), CASES)
def test_annotation(error: PybuildError, workspace: str | None, annotation: str) -> None:
    assert github_annotation(error, workspace) == annotation


def test_a_dockerfile_error_is_annotated_on_github_only(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM scratch\nFROOM x\n")
    environment = {**os.environ, "PYBUILD_ROOT": str(tmp_path / "store"), "GITHUB_WORKSPACE": str(tmp_path)}
    for github, shown in (("true", True), ("", False)):
        done = run([*PYBUILD, "build", str(tmp_path)], env={**environment, "GITHUB_ACTIONS": github}, check=False)
        assert done.returncode == 1
        assert f"{tmp_path}/Dockerfile:2:1: unknown instruction: FROOM" in done.stderr
        expected = "::error file=Dockerfile,line=2,endLine=2,col=1,title=pybuild::unknown instruction: FROOM"
        assert (expected in done.stdout) == shown, done.stdout
