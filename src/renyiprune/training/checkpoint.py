"""Atomic training checkpoints: a file is either the complete old one or the complete new one.

Everything is written through ``utils.io.atomic_write`` (a temporary file in the same folder, flushed to
disk, then renamed over the target), so a crash or kill at any moment never leaves a truncated checkpoint.
Checkpoints hold only tensors and plain Python values, so they load with
``torch.load(weights_only=True)`` and ``renyiprune.weights.read_state_dict`` finds the model under "model".
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..utils.io import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "save_weights", "rng_state", "set_rng_state"]


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write a training state dict (tensors and plain values) atomically with ``torch.save``."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def save_weights(path: str | Path, state_dict: dict, metadata: dict[str, str] | None = None) -> Path:
    """Write model weights as ``.safetensors`` atomically (what ``renyiprune eval --weights`` reads)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def rng_state() -> dict:
    """Python, NumPy, torch CPU (and CUDA) generator states as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
