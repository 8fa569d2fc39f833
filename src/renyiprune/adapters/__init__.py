"""Host-model adapters: let ``renyiprune.patch`` prune ViTs that are not our own ``VisionTransformer``.

An adapter recognizes a family of models (Hugging Face ``transformers`` ViT/DeiT, timm's
``VisionTransformer``) and gives their layers the interface our pruning block uses (``norm1``, ``attn``
with ``qkv_heads``/``scale``/``merge_heads``, ``drop_path1``, ``norm2``, ``mlp``, ``drop_path2``).
``check_model`` turns every model we cannot prune into one clear ``UnsupportedModelError`` that names
what is missing, instead of an AttributeError in the middle of a forward.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from types import SimpleNamespace

from torch import nn

__all__ = ["HostView", "UnsupportedModelError", "check_model", "find_adapter", "patch_with_adapter"]


class UnsupportedModelError(TypeError):
    """``renyiprune.patch`` met a model it cannot prune; the message says what is missing."""


_WINDOWED = ("swin", "window")


def _windowed(model: nn.Module) -> str | None:
    """The name of a module that does windowed/local attention, if any."""
    for m in model.modules() if isinstance(model, nn.Module) else ():
        name = type(m).__name__.lower()
        if any(w in name for w in _WINDOWED) or hasattr(m, "window_size"):
            return type(m).__name__
    return None


def find_adapter(model: nn.Module) -> Callable | None:
    """The patch function of the adapter that handles ``model``; None for a native renyiprune ViT."""
    from . import hf, timm

    if isinstance(model, HostView):  # the stand-in an adapter passes on: its blocks are adapted already
        return None
    for mod in (hf, timm):
        if mod.handles(model):
            return mod.patch
    return None


def check_windowed(model: nn.Module) -> None:
    """UnsupportedModelError when ``model`` uses windowed attention (Swin and the like)."""
    win = _windowed(model)
    if win is not None:
        raise UnsupportedModelError(
            f"renyiprune.patch cannot prune {type(model).__name__}: it uses windowed attention ({win}); "
            "token pruning needs global attention over a CLS token and all patches (ViT/DeiT)"
        )


def check_token_layout(model: nn.Module, max_prefix: int | None = None) -> None:
    """UnsupportedModelError unless the tokens are [CLS, other prefix tokens..., patches]: a CLS token
    first, ``num_prefix_tokens`` P >= 1 prefix tokens in all (at most ``max_prefix`` where the caller
    supports no more), a known patch count. Prefix tokens are always kept and never ranked or merged."""
    name = type(model).__name__
    if getattr(model, "cls_token", None) is None:
        raise UnsupportedModelError(
            f"renyiprune.patch cannot prune {name}: it has no CLS token (cls_token); pruning keeps the CLS "
            "token and ranks the patches by attention"
        )
    prefix = getattr(model, "num_prefix_tokens", 1)
    if isinstance(prefix, bool) or not isinstance(prefix, numbers.Integral) or prefix < 1:
        raise UnsupportedModelError(
            f"renyiprune.patch cannot prune {name}: num_prefix_tokens is {prefix!r}; expected the number "
            "(>= 1) of tokens before the patches, CLS first"
        )
    if max_prefix is not None and prefix > max_prefix:
        raise UnsupportedModelError(
            f"renyiprune.patch cannot prune {name}: it has {prefix} prefix tokens (CLS plus distillation or "
            f"register tokens); for this kind of model only {max_prefix} (a single CLS token) is supported"
        )
    if not hasattr(getattr(model, "patch_embed", None), "num_patches"):
        raise UnsupportedModelError(
            f"renyiprune.patch cannot prune {name}: it has no patch_embed.num_patches"
        )


def check_model(model: nn.Module) -> Sequence[nn.Module]:
    """The blocks of a native (renyiprune-interface) ViT; UnsupportedModelError naming what is missing."""
    name = type(model).__name__
    check_windowed(model)
    if not hasattr(model, "blocks"):
        raise UnsupportedModelError(
            f"renyiprune.patch cannot prune {name}: it has no 'blocks' list of transformer blocks "
            "(supported: renyiprune's VisionTransformer, Hugging Face ViT/DeiT, timm VisionTransformer)"
        )
    check_token_layout(model)
    blocks = list(model.blocks)
    need = ("norm1", "attn", "norm2", "mlp")
    for i, b in enumerate(blocks):
        lacking = [a for a in need if not hasattr(b, a)]
        attn = getattr(b, "attn", None)
        lacking += [
            f"attn.{a}" for a in ("qkv_heads", "merge_heads", "scale") if attn and not hasattr(attn, a)
        ]
        if lacking:
            raise UnsupportedModelError(
                f"renyiprune.patch cannot prune block {i} ({type(b).__name__}) of {name}: it has no "
                f"{', '.join(lacking)}"
            )
    return blocks


class HostView:
    """A stand-in that ``renyiprune.patch`` can configure: the host's (adapted) blocks, patch count and
    CLS token, and how many prefix tokens (CLS first, then e.g. a distillation token) precede the
    patches. The host model itself is then given the resulting state (``patch_with_adapter``)."""

    def __init__(
        self, blocks: Sequence[nn.Module], num_patches: int, cls_token, name: str, num_prefix_tokens: int = 1
    ):
        self.blocks = list(blocks)
        self.patch_embed = SimpleNamespace(num_patches=num_patches)
        self.cls_token = cls_token
        self.pretrained_cfg = SimpleNamespace(name=name)
        self.num_prefix_tokens = num_prefix_tokens


def patch_with_adapter(
    model: nn.Module,
    adapt: Callable[[], tuple[HostView, dict[int, type]]],
    model_mixin: type,
    core_patch: Callable[..., object],
    **kwargs,
) -> nn.Module:
    """Adapt the host's layers (``adapt`` returns the view and id -> original class of every module it
    re-classed), patch the view with ``core_patch``, then make ``model`` the patched one: it carries the
    state, its class gets ``model_mixin``, and ``unpatch(model)`` restores the host's own classes."""
    from ..patch import is_patched, unpatch

    if kwargs.get("budget") is not None:
        raise UnsupportedModelError(
            f"budget= is not supported for {type(model).__name__}; pass keep_rate (or r for ToMe)"
        )
    if is_patched(model):
        unpatch(model)
    view, originals = adapt()
    modules = [m for m in model.modules() if id(m) in originals]
    try:
        core_patch(view, **kwargs)
    except BaseException:
        for m in modules:
            m.__class__ = originals[id(m)]
        raise
    state = view.renyiprune
    state.original_classes.pop(id(view), None)
    for m in modules:
        if "_renyiprune" in m.__dict__:  # a pruning location: unpatch restores the host's class
            state.original_classes[id(m)] = originals[id(m)]
        else:  # adapted only for the check: back to the host's class now
            m.__class__ = originals[id(m)]
            state.original_classes.pop(id(m), None)
    state.original_classes[id(model)] = model.__class__
    model.__class__ = type(f"Pruning{model.__class__.__name__}", (model_mixin, model.__class__), {})
    model.renyiprune = state
    return model
