"""Helpers for tests_timm: real timm models built offline, and the reference side of every comparison,
renyiprune's own VisionTransformer holding a timm ViT's weights.

Our model uses timm's parameter names, so DeiT/ViT weights load unchanged. A LayerScale model (DeiT III)
has no counterpart in our model; its weights become an exactly equivalent plain ViT: each ``ls1``/``ls2``
gain multiplies the rows of the projection it follows (attn.proj, mlp.fc2), and with ``no_embed_class``
(position embeddings for the patches only) the CLS token gets a zero position embedding.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import Tensor, nn

import renyiprune as rp

#: DeiT-Tiny's official ImageNet weights and 100 labelled images, shipped in the repository for the demo.
DEMO = Path(__file__).resolve().parents[1] / "demo"
DEMO_WEIGHTS = DEMO / "weights" / "deit_tiny_patch16_224.safetensors"

#: The timm models compared against renyiprune's own model; deit3 is the LayerScale one.
MODELS = [
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "vit_small_patch16_224",
    "deit3_small_patch16_224",
]

#: timm model -> the renyiprune registry entry with the same architecture (ViT-S/16 is DeiT-S's shape;
#: DeiT III-S with its LayerScale folded away is too).
OURS = {
    "deit_tiny_patch16_224": "deit_tiny_patch16_224",
    "deit_small_patch16_224": "deit_small_patch16_224",
    "vit_small_patch16_224": "deit_small_patch16_224",
    "deit3_small_patch16_224": "deit_small_patch16_224",
}


def folded_state_dict(timm_model: nn.Module) -> dict[str, Tensor]:
    """The timm model's weights under our names, LayerScale folded, CLS position added where missing."""
    sd = {k: v.detach().clone() for k, v in timm_model.state_dict().items()}
    for i in range(len(timm_model.blocks)):
        for ls, lin in (("ls1", "attn.proj"), ("ls2", "mlp.fc2")):
            gamma = sd.pop(f"blocks.{i}.{ls}.gamma", None)
            if gamma is not None:  # ls(W x + b) = (gamma W) x + gamma b
                sd[f"blocks.{i}.{lin}.weight"] = gamma[:, None] * sd[f"blocks.{i}.{lin}.weight"]
                sd[f"blocks.{i}.{lin}.bias"] = gamma * sd[f"blocks.{i}.{lin}.bias"]
    if getattr(timm_model, "no_embed_class", False):
        pe = sd["pos_embed"]
        sd["pos_embed"] = torch.cat([pe.new_zeros(1, 1, pe.shape[-1]), pe], dim=1)
    return sd


def ours_like(name: str, timm_model: nn.Module) -> nn.Module:
    """``renyiprune.create_model`` of the same architecture with ``timm_model``'s weights (eval mode)."""
    return rp.create_model(OURS[name], weights=folded_state_dict(timm_model))


def build_timm(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False)`` in eval mode, seeded. LayerScale gains are drawn
    per channel from {1/8, 1/4, 1/2, 1}: timm initialises them to ~1e-6, which would make every block
    nearly the identity; powers of two keep the folded reference exact in float32 (scaling by 2^-j
    commutes with every rounding step, so gamma (W x + b) and (gamma W) x + gamma b are the same bits)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        for b in getattr(model, "blocks", []):
            for ls in (getattr(b, "ls1", None), getattr(b, "ls2", None)):
                if hasattr(ls, "gamma"):
                    ls.gamma.copy_(2.0 ** -torch.randint(0, 4, ls.gamma.shape).float())
    return model


def structure(model: nn.Module) -> list[tuple[str, type]]:
    """Every submodule's name and class: what patch changes and unpatch must restore."""
    return [(name, type(m)) for name, m in model.named_modules()]
