"""Shared test fixtures: where BuildKit's conformance data lives."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFORMANCE = REPO_ROOT.parent / "shared" / "conformance"


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    if not CONFORMANCE.is_dir():
        pytest.skip(f"BuildKit conformance data not found at {CONFORMANCE}; it lives beside the checkout")
    return CONFORMANCE
