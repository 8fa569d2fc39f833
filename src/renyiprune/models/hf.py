"""Hugging Face ``transformers`` ViT weights: conversion between its names and ours, and its config.

Two layouts of the same weights exist: transformers 4.x (and every checkpoint on the Hub) names them
``encoder.layer.i.attention.attention.query`` ...; transformers 5.x ``layers.i.attention.q_proj`` ...
(``from_pretrained`` renames the Hub names on load). Conversion writes the Hub names and reads both.
transformers is imported only when a config object is asked for (``pip install renyiprune[hf]``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .model import get_spec
from .weights import load_state_dict_strict

__all__ = ["to_hf", "from_hf", "config_dict", "hf_config", "load_into_hf", "hf_layout"]

# our name (per block, after "blocks.i.") -> Hub (4.x) name and 5.x name, after "<layers>.i."
_BLOCK_NAMES = {
    "norm1": ("layernorm_before", "layernorm_before"),
    "attn.proj": ("attention.output.dense", "attention.o_proj"),
    "norm2": ("layernorm_after", "layernorm_after"),
    "mlp.fc1": ("intermediate.dense", "mlp.fc1"),
    "mlp.fc2": ("output.dense", "mlp.fc2"),
}
_QKV = {"v4": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
        "v5": ("attention.q_proj", "attention.k_proj", "attention.v_proj")}  # fmt: skip
_LAYERS = {"v4": "encoder.layer", "v5": "layers"}
_TOP = {  # our name -> HF name below the base-model prefix (the head has no prefix)
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj": "embeddings.patch_embeddings.projection",
    "norm": "layernorm",
}


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("Hugging Face support needs transformers: pip install 'renyiprune[hf]'") from e
    return transformers



def hf_layout(keys) -> str:
    """'v5' when the names are transformers 5.x's (``layers.i.attention.q_proj``), else 'v4' (the Hub's)."""
    return "v5" if any(re.search(r"(^|\.)layers\.\d+\.", k) for k in keys) else "v4"


def to_hf(sd: Mapping[str, Tensor], layout: str = "v4", base: str = "vit", head: bool = True) -> dict:
    """Our (timm) state dict -> HF ``ViTForImageClassification`` names (``head=False``, ``base=''``: a
    ``ViTModel``). The fused qkv projection is split into query/key/value."""
    if layout not in _LAYERS:
        raise ValueError(f"layout must be v4 or v5, got {layout!r}")
    pre = f"{base}." if base else ""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", k)
        if m:
            i, name, kind = m.groups()
            stem = f"{pre}{_LAYERS[layout]}.{i}."
            if name == "attn.qkv":
                for part, tensor in zip(_QKV[layout], v.chunk(3, dim=0), strict=True):
                    out[f"{stem}{part}.{kind}"] = tensor.clone()
                continue
            if name not in _BLOCK_NAMES:
                raise ValueError(f"cannot convert {k!r} to Hugging Face names")
            out[f"{stem}{_BLOCK_NAMES[name][layout == 'v5']}.{kind}"] = v
            continue
        if k.startswith("head."):
            if head:
                out["classifier." + k[len("head.") :]] = v
            continue
        stem, _, kind = k.rpartition(".") if k not in _TOP else (k, "", "")
        if stem not in _TOP:
            raise ValueError(f"cannot convert {k!r} to Hugging Face names")
        out[pre + _TOP[stem] + (f".{kind}" if kind else "")] = v
    return out


def from_hf(sd: Mapping[str, Tensor]) -> dict:
    """HF ViT state dict (Hub/4.x or 5.x names, with or without the ``vit.`` prefix) -> our names.

    Only the distillation-token-free ViT layout maps onto our model; the pooler is dropped."""
    if any("distillation_token" in k for k in sd):
        raise ValueError("this is a DeiT checkpoint with a distillation token; renyiprune's model has none")
    layout = hf_layout(sd)
    rev_top = {v: k for k, v in _TOP.items()}
    rev_block = {names[layout == "v5"]: ours for ours, names in _BLOCK_NAMES.items()}
    qkv: dict[tuple[str, str], dict[int, Tensor]] = {}
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        name = re.sub(r"^(vit|deit|model)\.", "", k)
        if name.startswith("pooler."):
            continue
        if name.startswith("classifier."):
            out["head." + name[len("classifier.") :]] = v
            continue
        m = re.fullmatch(re.escape(_LAYERS[layout]) + r"\.(\d+)\.(.+)\.(weight|bias)", name)
        if m:
            i, part, kind = m.groups()
            if part in _QKV[layout]:
                qkv.setdefault((i, kind), {})[_QKV[layout].index(part)] = v
            elif part in rev_block:
                out[f"blocks.{i}.{rev_block[part]}.{kind}"] = v
            else:
                raise ValueError(f"cannot convert Hugging Face key {k!r}")
            continue
        stem, _, kind = name.rpartition(".") if name not in rev_top else (name, "", "")
        if stem not in rev_top:
            raise ValueError(f"cannot convert Hugging Face key {k!r}")
        out[rev_top[stem] + (f".{kind}" if kind else "")] = v
    for (i, kind), parts in qkv.items():
        if len(parts) != 3:
            raise ValueError(f"layer {i}: query/key/value {kind} incomplete")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[j] for j in range(3)], dim=0)
    return out


def config_dict(model_name: str = "deit_tiny_patch16_224", num_classes: int | None = None) -> dict:
    """The ``config.json`` of an HF ``ViTForImageClassification`` equal to one of our registered models
    (exact layer-norm eps and GELU); plain data, so converting needs no transformers."""
    spec = get_spec(model_name)
    kw = dict(spec.kwargs)
    dim = kw["embed_dim"]
    return dict(
        model_type="vit", architectures=["ViTForImageClassification"], hidden_size=dim,
        num_hidden_layers=kw["depth"], num_attention_heads=kw["num_heads"],
        intermediate_size=int(dim * kw.get("mlp_ratio", 4.0)), hidden_act="gelu", layer_norm_eps=1e-6,
        image_size=spec.img_size, patch_size=kw["patch_size"], num_channels=3, qkv_bias=True,
        num_labels=num_classes or kw.get("num_classes", 1000), hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, initializer_range=0.02, encoder_stride=kw["patch_size"],
    )  # fmt: skip


def hf_config(model_name: str = "deit_tiny_patch16_224", **overrides):
    """A ``transformers.ViTConfig`` equal to one of our registered models."""
    tf = _import_transformers()
    cfg = config_dict(model_name)
    num_labels = overrides.pop("num_labels", cfg.pop("num_labels"))
    for k in ("model_type", "architectures"):
        cfg.pop(k)
    cfg.update(overrides)
    return tf.ViTConfig(num_labels=num_labels, **cfg)


def load_into_hf(hf_model: nn.Module, sd: Mapping[str, Tensor]) -> nn.Module:
    """Load our (timm-named) state dict into an HF ViT model instance, strictly (a pooler keeps its init)."""
    own = hf_model.state_dict()
    base = "vit" if any(k.startswith("vit.") for k in own) else ""
    converted = to_hf(sd, hf_layout(own), base=base, head=any(k.startswith("classifier.") for k in own))
    load_state_dict_strict(hf_model, converted, drop_prefixes=(f"{base}.pooler." if base else "pooler.",))
    return hf_model
