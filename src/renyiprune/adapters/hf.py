"""Hugging Face ``transformers`` ViT/DeiT: weight conversion and pruning of its layers in place.

Two layouts of the same weights exist: transformers 4.x (and every checkpoint on the Hub) names them
``encoder.layer.i.attention.attention.query`` ...; transformers 5.x ``layers.i.attention.q_proj`` ...
(``from_pretrained`` renames the Hub names on load). Conversion writes the Hub names and reads both.

Pruning: each HF layer at a pruning location gets a class that exposes our block interface on top of
its own modules (no copies): ``layernorm_before``/``layernorm_after`` as norm1/norm2, an attention
adapter whose ``qkv_heads``/``merge_heads`` use the HF projections (so the pruning block computes the
attention logits itself even where HF runs fused SDPA), and the MLP without HF's internal residual.
DeiT's distillation token (position 1, after CLS) is a second prefix token: kept, never ranked or merged.
transformers is imported only when a model or config needs it (``pip install renyiprune[hf]``).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from . import HostView, UnsupportedModelError, check_windowed, patch_with_adapter

__all__ = ["handles", "patch", "to_hf", "from_hf", "config_dict", "hf_config", "load_into_hf", "hf_layout"]

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


# --------------------------------------------------------------------------------------------- weights


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
    from ..model import get_spec

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
    from ..weights import load_state_dict_strict

    own = hf_model.state_dict()
    base = "vit" if any(k.startswith("vit.") for k in own) else ""
    converted = to_hf(sd, hf_layout(own), base=base, head=any(k.startswith("classifier.") for k in own))
    load_state_dict_strict(hf_model, converted, drop_prefixes=(f"{base}.pooler." if base else "pooler.",))
    return hf_model


# --------------------------------------------------------------------------------------------- pruning


def handles(model: nn.Module) -> bool:
    """True for any transformers model: ``patch`` then prunes it or says why it cannot."""
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def _base(model: nn.Module) -> nn.Module:
    for attr in ("vit", "deit"):
        if isinstance(getattr(model, attr, None), nn.Module):
            return getattr(model, attr)
    return model


def _layers(base: nn.Module):
    if hasattr(base, "layers"):
        return base.layers
    enc = getattr(base, "encoder", None)
    return getattr(enc, "layer", None)


class _Identity:
    def __call__(self, x: Tensor) -> Tensor:
        return x


class _Attention:
    """Our attention interface on an HF attention module (4.x ``attention.attention.query`` ... or 5.x
    ``attention.q_proj`` ...): qkv_heads (B, H, N, D) x 3, scale, merge_heads -> output projection."""

    def __init__(self, layer: nn.Module):
        att = layer.attention
        if hasattr(att, "q_proj"):
            self.q, self.k, self.v, self.o = att.q_proj, att.k_proj, att.v_proj, att.o_proj
            self.heads, self.head_dim = att.num_attention_heads, att.head_dim
            self.out_drop = _Identity()
        else:
            s = att.attention
            self.q, self.k, self.v, self.o = s.query, s.key, s.value, att.output.dense
            self.heads, self.head_dim = s.num_attention_heads, s.attention_head_size
            self.out_drop = att.output.dropout
        self.scale = self.head_dim**-0.5

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, _ = x.shape

        def split(lin: nn.Module) -> Tensor:
            return lin(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)

        return split(self.q), split(self.k), split(self.v)

    def merge_heads(self, out: Tensor) -> Tensor:
        B, H, N, D = out.shape
        return self.out_drop(self.o(out.transpose(1, 2).reshape(B, N, H * D)))


class _Layer:
    """Mixin before an HF ViT/DeiT layer class: our block interface over the layer's own modules.

    HF calls a layer with extra arguments (attention mask, head mask, flags); the pruning forward takes
    the hidden states only, and returns what the HF loop expects (a tensor in 5.x, a 1-tuple in 4.x).
    """

    _renyiprune_tuple = False

    norm1 = property(lambda self: self.layernorm_before)
    norm2 = property(lambda self: self.layernorm_after)
    attn = property(lambda self: _Attention(self))

    @property
    def drop_path1(self):  # 5.x: the layer's dropout after attention; 4.x: inside attention.output
        return self._modules.get("dropout") or _Identity()

    drop_path2 = drop_path1

    @property
    def mlp(self):
        if "mlp" in self._modules:  # 5.x: fc1 -> act -> fc2
            return self._modules["mlp"]
        inter, out = self._modules["intermediate"], self._modules["output"]  # 4.x: residual inside output
        return lambda h: out.dropout(out.dense(inter(h)))

    def __call__(self, hidden_states: Tensor, *args, **kwargs):
        y = nn.Module.__call__(self, hidden_states)
        return (y,) if self._renyiprune_tuple else y


class _HFPrunedModel:
    """Mixin before the HF model class: starts the pruning state from the pixel grid, runs HF's forward."""

    renyiprune: object

    def forward(self, *args, **kwargs):
        state = self.renyiprune
        pixels = kwargs["pixel_values"] if kwargs.get("pixel_values") is not None else args[0]
        p = _base(self).embeddings.patch_embeddings.patch_size
        ph, pw = (p, p) if isinstance(p, int) else tuple(p)
        n = (pixels.shape[-2] // ph) * (pixels.shape[-1] // pw)
        state.begin(pixels.shape[0], n, pixels.device)
        out = super().forward(*args, **kwargs)
        state.step += 1
        return out


def _returns_tuple(cls: type) -> bool:
    """transformers 4.x layers return a tuple (hidden_states, ...), 5.x the tensor."""
    ann = inspect.signature(cls.forward).return_annotation
    return "tuple" in str(ann).lower()


def _num_prefix(embeddings: nn.Module) -> int:
    """Tokens before the patches: CLS, plus DeiT's distillation token where the embeddings carry one."""
    return 1 + (getattr(embeddings, "distillation_token", None) is not None)


def _check(model: nn.Module) -> tuple[nn.Module, list]:
    name = type(model).__name__
    check_windowed(model)
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in ("vit", "deit") or not hasattr(_base(model), "embeddings"):
        raise UnsupportedModelError(
            f"renyiprune.patch cannot prune {name} (model type {kind!r}): of transformers' models only ViT "
            "and DeiT (ViTModel, ViTForImageClassification, DeiTModel, DeiTForImageClassification, "
            "DeiTForImageClassificationWithTeacher) are supported"
        )
    if name.endswith("ForMaskedImageModeling"):
        raise UnsupportedModelError(
            f"renyiprune.patch cannot prune {name}: its decoder reshapes every patch token back into the "
            "image grid, so no token can be removed; prune the encoder (ViTModel / DeiTModel) or a "
            "classifier instead"
        )
    base = _base(model)
    emb = base.embeddings
    if getattr(emb, "cls_token", None) is None:
        raise UnsupportedModelError(f"renyiprune.patch cannot prune {name}: its embeddings have no CLS token")
    layers = _layers(base)
    if layers is None:
        raise UnsupportedModelError(f"renyiprune.patch cannot prune {name}: no transformer layers found")
    for i, layer in enumerate(layers):
        lacking = [a for a in ("attention", "layernorm_before", "layernorm_after") if not hasattr(layer, a)]
        if not hasattr(layer, "mlp") and not hasattr(layer, "intermediate"):
            lacking.append("mlp/intermediate")
        if lacking:
            raise UnsupportedModelError(
                f"renyiprune.patch cannot prune layer {i} ({type(layer).__name__}) of {name}: it has no "
                f"{', '.join(lacking)}"
            )
    return base, list(layers)


def patch(model: nn.Module, core_patch: Callable[..., object], **kwargs) -> nn.Module:
    """``renyiprune.patch`` for a transformers ViT: adapt the layers, configure pruning, keep HF's forward."""
    from ..patch import unpatch

    base, layers = _check(unpatch(model))

    def adapt() -> tuple[HostView, dict[int, type]]:
        originals = {}
        for layer in layers:
            cls = layer.__class__
            originals[id(layer)] = cls
            layer.__class__ = type(cls.__name__, (_Layer, cls), {"_renyiprune_tuple": _returns_tuple(cls)})
        emb = base.embeddings
        n = emb.patch_embeddings.num_patches
        view = HostView(layers, n, emb.cls_token, _model_name(model), num_prefix_tokens=_num_prefix(emb))
        return view, originals

    return patch_with_adapter(model, adapt, _HFPrunedModel, core_patch, **kwargs)


def _model_name(model: nn.Module) -> str:
    """Our registry name for a tuned-policy lookup (criterion='best'): DeiT sizes by hidden size."""
    cfg = getattr(model, "config", SimpleNamespace())
    size = {192: "tiny", 384: "small", 768: "base"}.get(getattr(cfg, "hidden_size", 0), "tiny")
    return f"deit_{size}_patch16_224"
