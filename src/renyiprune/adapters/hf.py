"""Hugging Face ``transformers`` ViT/DeiT as a host: its layers pruned in place.

Each HF layer at a pruning location gets a class that exposes our block interface on top of
its own modules (no copies): ``layernorm_before``/``layernorm_after`` as norm1/norm2, an attention
adapter whose ``qkv_heads``/``merge_heads`` use the HF projections (so the pruning block computes the
attention logits itself even where HF runs fused SDPA), and the MLP without HF's internal residual.
DeiT's distillation token (position 1, after CLS) is a second prefix token: kept, never ranked or merged.
Weight conversion lives in ``renyiprune.models.hf``; transformers itself is never imported here.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

from torch import Tensor, nn

from ..core.hosts import Adaptation, Host, HostView, UnsupportedModelError, check_windowed

__all__ = ["handles", "adapt", "HOST"]



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
        state.end()
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


def adapt(model: nn.Module) -> Adaptation:
    """Check an (unpatched) transformers ViT and give its layers our block interface; HF's forward stays."""
    base, layers = _check(model)
    originals = {}
    for layer in layers:
        cls = layer.__class__
        originals[id(layer)] = cls
        layer.__class__ = type(cls.__name__, (_Layer, cls), {"_renyiprune_tuple": _returns_tuple(cls)})
    emb = base.embeddings
    n = emb.patch_embeddings.num_patches
    view = HostView(layers, n, emb.cls_token, _model_name(model), num_prefix_tokens=_num_prefix(emb))
    return Adaptation(view, originals, _HFPrunedModel)


def _model_name(model: nn.Module) -> str:
    """Our registry name for a tuned-policy lookup (criterion='best'): DeiT sizes by hidden size."""
    cfg = getattr(model, "config", SimpleNamespace())
    size = {192: "tiny", 384: "small", 768: "base"}.get(getattr(cfg, "hidden_size", 0), "tiny")
    return f"deit_{size}_patch16_224"


HOST = Host("transformers", handles, adapt, _model_name)
