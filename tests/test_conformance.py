"""BuildKit's own parser test data: every dump must match, every negative case must be rejected."""

from __future__ import annotations

from pathlib import Path

import pytest

from parser import DockerfileSyntaxError, dump, parse_raw

PARSER = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "parser"


def _cases(folder: str) -> list:
    where = PARSER / folder
    if not where.is_dir():
        reason = f"BuildKit conformance data not found at {where}; it lives beside the checkout"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="corpus-absent")]
    return [pytest.param(p, id=p.name) for p in sorted(where.iterdir()) if p.is_dir()]


@pytest.mark.parametrize("case", _cases("testfiles"))
def test_dump_matches_buildkit(conformance_dir: Path, case: Path) -> None:
    source = (case / "Dockerfile").read_bytes()
    expected = (case / "result").read_bytes().decode("utf-8").replace("\r\n", "\n")
    assert dump(parse_raw(source)) + "\n" == expected


@pytest.mark.parametrize("case", _cases("testfiles"))
def test_crlf_parses_like_lf(conformance_dir: Path, case: Path) -> None:
    source = (case / "Dockerfile").read_bytes()
    assert dump(parse_raw(source.replace(b"\n", b"\r\n"))) == dump(parse_raw(source))


@pytest.mark.parametrize("case", _cases("testfiles-negative"))
def test_negative_case_is_rejected(conformance_dir: Path, case: Path) -> None:
    with pytest.raises(DockerfileSyntaxError):
        parse_raw((case / "Dockerfile").read_bytes())


def test_corpus_is_complete(conformance_dir: Path) -> None:
    """Guard against a partly copied corpus passing vacuously."""
    assert len(_cases("testfiles")) == 33
    assert len(_cases("testfiles-negative")) == 4


def test_line_numbers(conformance_dir: Path) -> None:
    raw = parse_raw((PARSER / "testfile-line" / "Dockerfile").read_bytes())
    assert [(n.start_line, n.end_line) for n in raw.nodes] == [(5, 5), (11, 12), (17, 31)]
    # Blank lines inside the continuation are skipped with a warning, as BuildKit does.
    assert [w.line for w in raw.warnings] == [17]
    assert raw.warnings[0].message.startswith("Empty continuation line found in: RUN apt-get update")
