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


@pytest.fixture
def images_read(monkeypatch) -> list[str]:
    """Paths of every image the code under test opens (``renyiprune.data.load_image`` spied on)."""
    from renyiprune.data import images as data

    read: list[str] = []
    real = data.load_image

    def spy(path):
        read.append(str(path))
        return real(path)

    monkeypatch.setattr(data, "load_image", spy)
    return read
