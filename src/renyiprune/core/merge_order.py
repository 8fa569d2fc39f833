"""Merge orders for ToMe: which tokens merge first, besides how similar they are to their match.

A merge order maps a block's attention logits (B, H, N, N) to a per-image z-scored score (B, N);
higher merges earlier. ``patch(model, method="tome", entropy_weight=w, merge_order=NAME)`` adds
w x that score to each A token's best similarity before ToMe picks its r merges (the weight keeps the
name of the first order, Rényi entropy). Adding an order is one function and its decorator line.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .criteria import standardize
from .entropy import renyi_entropy

__all__ = ["MERGE_ORDERS", "register_merge_order", "list_merge_orders", "get_merge_order"]

MergeOrder = Callable[[Tensor, float], Tensor]
MERGE_ORDERS: dict[str, MergeOrder] = {}


def register_merge_order(name: str) -> Callable[[MergeOrder], MergeOrder]:
    """Decorator: make ``fn(logits, alpha) -> (B, N)`` available as merge order ``name``."""

    def deco(fn: MergeOrder) -> MergeOrder:
        MERGE_ORDERS[name] = fn
        return fn

    return deco


def list_merge_orders() -> list[str]:
    return sorted(MERGE_ORDERS)


def get_merge_order(name: str) -> MergeOrder:
    if name not in MERGE_ORDERS:
        raise ValueError(f"unknown merge order {name!r}; known: {', '.join(list_merge_orders())}")
    return MERGE_ORDERS[name]


@register_merge_order("entropy")
def entropy_order(logits: Tensor, alpha: float) -> Tensor:
    """Diffuse attention merges first: z-score of each token's Rényi row entropy H_alpha (mean over heads)."""
    return standardize(renyi_entropy(logits, alpha).mean(dim=1), eps=1e-6)


@register_merge_order("cls_attention")
def cls_attention_order(logits: Tensor, alpha: float) -> Tensor:
    """Tokens the CLS query attends to least merge first (EViT's signal): minus the z-scored CLS
    attention, mean over heads. ``alpha`` is unused."""
    return standardize(logits[:, :, 0].softmax(dim=-1).mean(dim=1).neg(), eps=1e-6)
