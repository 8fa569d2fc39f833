"""Analytic GMACs of a ViT forward from its token counts, and plans solved for a compute budget.

Per block with N_a tokens in attention and N_m in the MLP, width C (method notes, "Counting compute"):
3·N_a·C² (qkv) + 2·N_a²·C (scores and weighted sum) + N_a·C² (projection) + 2·r_mlp·N_m·C² (MLP),
plus the patch embedding (patches · p²·in_chans · C) and the head (C · classes).
The fixed token counts of a schedule make this exact; ``count_gmacs`` measures the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from ..core.api import prune, unpatched_copy
from ..core.plans import MergePlan, PrunePlan, tome_schedule
from ..core.selection import check_fusion, keep_count
from .build import PatchArgs, build_plan
from .flops import count_gmacs

__all__ = [
    "VitShape", "prune_counts", "tome_counts", "merge_macs", "tome_macs", "tome_schedule", "solve_keep_rate",
    "solve_tome_r", "plan_for_budget",
]  # fmt: skip


def _head_dim(attn) -> int:
    if hasattr(attn, "head_dim"):
        return int(attn.head_dim)
    return int(attn.qkv.in_features // attn.num_heads)

Counts = list[tuple[int, int]]


@dataclass(frozen=True)
class VitShape:
    """The dimensions that decide a ViT's compute."""

    embed_dim: int
    depth: int
    num_patches: int
    mlp_ratio: float = 4.0
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    num_prefix: int = 1  # tokens before the patches (CLS, distillation, ...), never pruned or merged
    head_dim: int = 64  # width of the keys whose head-mean is the merge similarity metric

    @classmethod
    def of(cls, model) -> VitShape:
        """Read the shape of a ``renyiprune.model.VisionTransformer`` (or a timm-like ViT)."""
        blk = model.blocks[0]
        return cls(
            embed_dim=model.embed_dim if hasattr(model, "embed_dim") else model.cls_token.shape[-1],
            depth=len(model.blocks),
            num_patches=model.patch_embed.num_patches,
            mlp_ratio=blk.mlp.fc1.out_features / blk.mlp.fc1.in_features,
            patch_size=model.patch_embed.patch_size[0],
            in_chans=model.patch_embed.proj.in_channels,
            num_classes=getattr(model.head, "out_features", 0),
            num_prefix=int(getattr(model, "num_prefix_tokens", 1)),
            head_dim=_head_dim(blk.attn),
        )

    def gmacs(self, counts: Counts, extra_macs: float = 0.0) -> float:
        """GMACs per image for per-block (tokens in attention, tokens in MLP), plus ``extra_macs``
        (e.g. the similarity products of merging)."""
        C = self.embed_dim
        total = self.num_patches * self.patch_size**2 * self.in_chans * C + C * self.num_classes + extra_macs
        for na, nm in counts:
            total += 4 * na * C * C + 2 * na * na * C + 2 * self.mlp_ratio * nm * C * C
        return total / 1e9

    def unpruned(self) -> Counts:
        n = self.num_patches + self.num_prefix
        return [(n, n)] * self.depth


def prune_counts(
    shape: VitShape, locations: Sequence[int], keep_rates: Sequence[float], fuse: bool, fusion: str = "evit"
) -> Counts:
    """Token counts when ceil(r·n) of the n candidates are kept at each location (plus a fused token).

    ``fusion="evit"``: after the first fused stage the fused token is one of the n candidates (n = kept
    + 1), so later stages keep ceil(r·(k + 1)); ``"renorm"``: n counts patches only and the fused
    token rides along.
    """
    fusion = check_fusion(fusion)
    rates = dict(zip(locations, keep_rates, strict=True))
    n, extra, counts = shape.num_patches, 0, []  # extra: a fused token outside the n candidates
    for i in range(shape.depth):
        na = shape.num_prefix + n + extra
        if i in rates:
            k = keep_count(n, rates[i])
            if fusion == "evit":
                n = k + 1 if (fuse and k < n) else k
            else:
                extra = 1 if (fuse and (k < n or extra)) else extra
                n = k
        counts.append((na, shape.num_prefix + n + extra))
    return counts


def merge_macs(shape: VitShape, locations: Sequence[int], keep_rates: Sequence[float]) -> float:
    """MACs of pruning with ``removed="merge"``: at each location the n current patches' similarity to
    the k kept ones (n x k x head_dim), the product ``merging.merge_into_kept`` computes."""
    n, total = shape.num_patches, 0.0
    for _, r in sorted(zip(locations, keep_rates, strict=True)):
        k = keep_count(n, r)
        total += n * k * shape.head_dim
        n = k
    return total


def tome_macs(shape: VitShape, r: Sequence[int]) -> float:
    """MACs of ToMe's bipartite matching: set A (even tokens) against set B (odd) at every merging block."""
    total = 0.0
    for (na, nm) in tome_counts(shape, r):
        if nm < na:
            total += ((na + 1) // 2) * (na // 2) * shape.head_dim
    return total


def tome_counts(shape: VitShape, r: Sequence[int]) -> Counts:
    """Token counts when block i merges r[i] tokens after its attention (ToMe's caps applied)."""
    n, counts = shape.num_patches + shape.num_prefix, []
    for i in range(shape.depth):
        ri = max(0, min(r[i], (n - shape.num_prefix) // 2))  # prefix never merged; at most half the rest
        counts.append((n, n - ri))
        n -= ri
    return counts


def _bisect(f: Callable[[float], float], lo: float, hi: float, target: float, steps: int = 40) -> float:
    """Largest x in [lo, hi] with f(x) <= target, f non-decreasing."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) <= target else (lo, mid)
    return lo


def solve_keep_rate(
    shape: VitShape,
    budget: float,
    locations: Sequence[int],
    fuse: bool = False,
    merge: bool = False,
    fusion: str = "evit",
) -> float:
    """The largest common keep rate whose GMACs (with merging's similarity products when ``merge``;
    token counts of the fusion rule ``fusion`` when ``fuse``) are <= budget × the unpruned model's."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    target = budget * shape.gmacs(shape.unpruned())

    def cost(r: float) -> float:
        rates = [r] * len(locations)
        extra = merge_macs(shape, locations, rates) if merge else 0.0
        return shape.gmacs(prune_counts(shape, locations, rates, fuse, fusion), extra)

    if cost(1e-6) > target:
        raise ValueError(f"budget {budget} is below what pruning at blocks {list(locations)} can reach "
                         f"({cost(1e-6) / shape.gmacs(shape.unpruned()):.3f})")
    r = _bisect(cost, 1e-6, 1.0, target) if cost(1.0) > target else 1.0
    # snap to the largest r giving the same keep counts, rounded for display
    return math.floor(r * 1e6) / 1e6


def solve_tome_r(shape: VitShape, budget: float, schedule: str = "constant") -> int:
    """The smallest r (tokens merged per block, or the schedule's mean) with GMACs <= budget × unpruned."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    target = budget * shape.gmacs(shape.unpruned())
    for r in range(0, shape.num_patches + 1):
        rs = tome_schedule(r, schedule, shape.depth)
        if shape.gmacs(tome_counts(shape, rs), tome_macs(shape, rs)) <= target:
            return r
    raise ValueError(f"budget {budget} is below what merging can reach")


def plan_for_budget(model: nn.Module, method: str | PrunePlan | MergePlan, budget: float, **options: Any
                    ) -> PrunePlan | MergePlan:
    """The plan like ``method`` with the largest GMACs <= ``budget`` x unpruned ``model``.

    ``method``: a plan whose keep rate (one, at every location) or r is solved, or "prune" / "tome" with
    ``options`` as ``patch`` takes them (criterion, alpha, locations, removed, fusion, schedule, criterion
    options). Pruning: the keep rate solved from the token counts, then lowered one first-location patch at
    a time until the counted GMACs (``count_gmacs`` on a parameter-sharing copy, which also sees a
    criterion's own products, e.g. Shannon's p @ K) fit. ToMe: the smallest r of its schedule. ``model``
    itself is not changed, and may be pruned or merged already (the plan is made for the unpatched model).
    """
    if isinstance(method, str):
        if method not in ("prune", "tome"):
            raise ValueError(f"method must be 'prune' or 'tome', got {method!r}")
        method = build_plan(PatchArgs.bind(method=method, **options))
    elif options:
        raise ValueError(f"plan_for_budget of a plan takes no options, got {', '.join(sorted(options))}")
    shape = VitShape.of(model)
    if isinstance(method, MergePlan):
        return replace(method, r=solve_tome_r(shape, budget, method.schedule))
    if not method.stages or any(s.tokens is not None for s in method.stages):
        raise ValueError("a budget is solved for a plan with pruning locations and keep rates, not tokens")
    rate = solve_keep_rate(shape, budget, method.locations, fuse=method.removed == "fuse",
                           merge=method.removed == "merge", fusion=method.fusion or "evit")  # fmt: skip
    plan = method.with_keep_rate(rate)
    if not hasattr(model, "patch_embed"):
        return plan
    target = budget * shape.gmacs(shape.unpruned()) * (1 + 1e-9)
    step = 1.0 / model.patch_embed.num_patches
    view = unpatched_copy(model)  # a pruned or merged model is planned for as if unpatched
    while count_gmacs(prune(view, plan)) > target:
        rate -= step
        if rate <= 0:
            raise ValueError(f"budget {budget} is below what this criterion can reach at these locations")
        plan = plan.with_keep_rate(rate)
    return plan
