"""Shared pytest fixtures."""

from pathlib import Path

import pytest

#: ``../shared/assets`` relative to the repository root: real images and weights used by the tests.
SHARED_ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


@pytest.fixture(scope="session")
def shared_assets() -> Path:
    """Path of ``../shared/assets``; skips the test with a clear reason when that folder is absent."""
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"../shared/assets not found: expected real test assets at {SHARED_ASSETS}")
    return SHARED_ASSETS
