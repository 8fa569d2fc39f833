"""Fixtures for tests_timm, which runs only in ``make test-timm``'s environment (PyPI's torch, torchvision
and timm); timm is imported unconditionally so that a missing timm is an error there, never a skip."""

import pytest
import timm  # noqa: F401
import torch


@pytest.fixture(scope="session")
def images() -> torch.Tensor:
    """Two random 224x224 images (the random-init models only need inputs, not photographs)."""
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
