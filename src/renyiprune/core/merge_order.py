"""Merge orders for ToMe: which tokens merge first, besides how similar they are to their match.

A merge order is criterion-like: ``fn(ctx, alpha) -> (B, N)``, a per-image z-scored score of every
token read from the block's attention context (``attention.AttentionContext``; all N tokens are
candidates, ``num_prefix=0``), registered with the ``Needs`` it reads so that the merging block computes
only that (``streamed.attend``). Higher merges earlier. ``patch(model, method="tome", entropy_weight=w,
merge_order=NAME)`` adds w x that score to each A token's best similarity before ToMe picks its r merges
(the weight keeps the name of the first order, Rényi entropy). Adding an order is one function and its
decorator line.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .attention import FULL, AttentionContext, Needs
from .criteria import standardize

__all__ = [
    "MERGE_ORDERS", "register_merge_order", "list_merge_orders", "get_merge_order", "merge_order_needs",
]  # fmt: skip

MergeOrder = Callable[[AttentionContext, float], Tensor]
MERGE_ORDERS: dict[str, MergeOrder] = {}


def register_merge_order(
    name: str, needs: Needs | Callable[[float], Needs] = FULL
) -> Callable[[MergeOrder], MergeOrder]:
    """Decorator: make ``fn(ctx, alpha) -> (B, N)`` available as merge order ``name``; ``needs`` (a
    ``Needs`` or a function of alpha returning one) is what it reads, by default the full attention."""

    def deco(fn: MergeOrder) -> MergeOrder:
        fn.needs = needs
        MERGE_ORDERS[name] = fn
        return fn

    return deco


def list_merge_orders() -> list[str]:
    return sorted(MERGE_ORDERS)


def get_merge_order(name: str) -> MergeOrder:
    if name not in MERGE_ORDERS:
        raise ValueError(f"unknown merge order {name!r}; known: {', '.join(list_merge_orders())}")
    return MERGE_ORDERS[name]


def merge_order_needs(name: str, alpha: float) -> Needs:
    """What merge order ``name`` reads at order ``alpha``."""
    spec = getattr(get_merge_order(name), "needs", FULL)
    return spec(alpha) if callable(spec) else spec


@register_merge_order("entropy", needs=lambda a: Needs(row_entropy=(a,)))
def entropy_order(ctx: AttentionContext, alpha: float) -> Tensor:
    """Diffuse attention merges first: z-score of each token's Rényi row entropy H_alpha (mean over heads)."""
    return standardize(ctx.row_entropy(alpha).mean(dim=1), eps=1e-6)


@register_merge_order("cls_attention", needs=Needs(cls_row=True))
def cls_attention_order(ctx: AttentionContext, alpha: float) -> Tensor:
    """Tokens the CLS query attends to least merge first (EViT's signal): minus the z-scored CLS
    attention, mean over heads. ``alpha`` is unused."""
    return standardize(ctx.cls_attn.neg(), eps=1e-6)
