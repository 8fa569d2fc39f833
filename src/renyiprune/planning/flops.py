"""Counting multiply-accumulates (GMACs) of an actual forward with torch's FlopCounterMode.

GMACs = FLOPs / 2 of the matrix products, the convention behind "DeiT-Tiny 1.3, DeiT-S 4.6".
torch 2.13 has no formula for the CPU kernel of ``scaled_dot_product_attention`` (it counts 0),
so one is registered here with the same q@k^T + attn@v count torch uses for the CUDA kernels.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["count_gmacs"]

aten = torch.ops.aten


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS = {}
if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops


@torch.inference_mode()
def count_gmacs(model: nn.Module, image: torch.Tensor | None = None, image_size: int | None = None) -> float:
    """GMACs per image of one forward of ``model`` (pruning included) on ``image`` (B, 3, H, W).

    Without ``image`` a zero batch of one at ``image_size`` (default: the model's) is used; for
    fixed keep rates the token counts, and so the count, do not depend on the pixels.
    """
    if image is None:
        size = image_size or model.patch_embed.img_size[0]
        p = next(model.parameters())
        image = torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype)
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    with counter:
        model(image)
    return counter.get_total_flops() / 2 / 1e9 / image.shape[0]
