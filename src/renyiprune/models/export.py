"""Deployable files: ONNX export of a pruned model and atomic writes of weight files.

A pruned ViT has a fixed keep rate, so every stage keeps a fixed number of tokens and the exported
graph has static token counts (top-k with a constant k); only the batch dimension is dynamic. Every
file is written under a temporary name and renamed into place, so a failed export leaves nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..utils.io import atomic_path

__all__ = ["save_safetensors", "export_onnx", "onnx_max_difference"]


def save_safetensors(
    sd: Mapping[str, Tensor], path: str | os.PathLike[str], metadata: dict | None = None
) -> None:
    """Write a state dict as .safetensors atomically (tensors made contiguous, no shared storage)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _import_onnx():
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"ONNX export needs onnx and onnxscript: pip install 'renyiprune[export]' ({e})"
        ) from e


def export_onnx(
    model: nn.Module, path: str | os.PathLike[str], image_size: int = 224, opset: int = 18
) -> Path:
    """Export ``model`` (pruned or not, in eval mode) to ONNX with a dynamic batch dimension.

    Uses the torch.export-based exporter; input ``images`` (B, 3, S, S), output ``logits`` (B, classes).
    """
    _import_onnx()
    model.eval()
    x = torch.randn(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with atomic_path(path) as tmp, torch.no_grad():
        program = torch.onnx.export(
            model, (x,), dynamo=True, input_names=["images"], output_names=["logits"],
            dynamic_shapes=({0: batch},), opset_version=opset, verbose=False,
        )  # fmt: skip
        program.save(str(tmp), external_data=False)  # one self-contained file (models < 2 GB)
    return Path(path)


def onnx_max_difference(path: str | os.PathLike[str], model: nn.Module, images: Tensor) -> float:
    """Largest absolute difference between onnxruntime's and torch's outputs on ``images``."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("checking an ONNX file needs onnxruntime: pip install 'renyiprune[export]'") from e
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: images.float().numpy()})[0]
    with torch.no_grad():
        want = model(images)
    return float((torch.from_numpy(got) - want).abs().max())
