"""Host models: how ``prune``/``merge`` reach ViTs that are not renyiprune's own ``VisionTransformer``.

A host adapter (``renyiprune.adapters``: Hugging Face ``transformers`` ViT/DeiT, timm's
``VisionTransformer``) registers a ``Host`` here: how to recognize its models and how to give their layers
the interface our pruning block uses (``norm1``, ``attn`` with ``qkv_heads``/``scale``/``merge_heads``,
``drop_path1``, ``norm2``, ``mlp``, ``drop_path2``). The core looks hosts up in this registry and never
imports an adapter. ``check_model`` turns every model we cannot prune into one clear
``UnsupportedModelError`` that names what is missing, instead of an AttributeError mid-forward.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

from torch import nn

__all__ = [
    "Adaptation", "Host", "HostView", "UnsupportedModelError", "check_model", "check_token_layout",
    "check_windowed", "find_host", "model_name", "register_host",
]  # fmt: skip


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
    """What the core configures in place of a host model: the host's (adapted) blocks, patch count and
    CLS token, and how many prefix tokens (CLS first, then e.g. a distillation token) precede the
    patches. The host model itself is then given the resulting state (``core.api``)."""

    def __init__(
        self, blocks: Sequence[nn.Module], num_patches: int, cls_token, name: str, num_prefix_tokens: int = 1
    ):
        self.blocks = list(blocks)
        self.patch_embed = SimpleNamespace(num_patches=num_patches)
        self.cls_token = cls_token
        self.pretrained_cfg = SimpleNamespace(name=name)
        self.num_prefix_tokens = num_prefix_tokens


@dataclass
class Adaptation:
    """A host model made prunable: the view the core configures, id -> original class of every module the
    adapter re-classed, and the mixin for the model's own class (None: the native one, which starts the
    pruning state in ``forward``)."""

    view: HostView
    originals: dict[int, type]
    model_mixin: type | None = None


@dataclass(frozen=True)
class Host:
    """A family of host models: ``handles(model)`` recognizes one, ``adapt(model)`` checks an unpatched one
    (UnsupportedModelError naming what is missing) and re-classes its layers, ``name_of(model)`` is the
    registry name whose tuned policy applies to it."""

    name: str
    handles: Callable[[nn.Module], bool]
    adapt: Callable[[nn.Module], Adaptation]
    name_of: Callable[[nn.Module], str]


HOSTS: list[Host] = []


def register_host(host: Host) -> Host:
    """Make ``prune``/``merge`` accept the models ``host.handles``; a host of the same name is replaced."""
    HOSTS[:] = [h for h in HOSTS if h.name != host.name]
    HOSTS.append(host)
    return host


def find_host(model: nn.Module) -> Host | None:
    """The registered host that handles ``model``; None for a native renyiprune ViT (or anything else)."""
    return next((h for h in HOSTS if h.handles(model)), None)


def model_name(model: nn.Module) -> str:
    """The registry name of ``model``, for a tuned-policy lookup (DeiT-Tiny when nothing says otherwise)."""
    host = find_host(model)
    if host is not None:
        return host.name_of(model)
    return getattr(getattr(model, "pretrained_cfg", None), "name", "deit_tiny_patch16_224")
