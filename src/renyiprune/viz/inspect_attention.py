"""What the attention does and what pruning keeps, as plain tensors (no plotting here).

* :func:`block_logits` records the attention logits of every block of the *unpruned* model, computed
  with each block's own ``Attention.qkv_heads`` and ``scale``, so figures show what the model computes.
* :func:`patch_entropy` is the renyi criterion's entropy per patch (its score is -H), so entropy maps
  agree with what the criterion ranks by.
* :func:`attention_distance` is Raghu et al. (2021)'s mean attention distance per head, in pixels.
* :func:`pruning_masks` runs a patched, weight-sharing view and reads which original patches survive.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.attention import Site, attention_logits
from ..core.criteria import make_criterion
from ..core.selection import keep_count
from ..core.state import StageRecord, is_patched
from ..core.streamed import explicit_context
from ..experiments.evaluate import pruned_view
from ..planning.build import PatchArgs, build_plan

__all__ = [
    "MaskSpec",
    "attention_distance",
    "block_logits",
    "entropy_maps",
    "grid_distances",
    "head_entropy",
    "kept_counts",
    "patch_entropy",
    "masks_from_records",
    "prune_records",
    "pruning_masks",
    "stage_entropies",
]


@torch.inference_mode()
def block_logits(model: nn.Module, images: Tensor) -> list[Tensor]:
    """Attention logits q.k * scale (B, H, N, N) of every block of the unpruned ``model`` on ``images``.

    A forward pre-hook on each block's ``attn`` recomputes the logits from that block's input, so the
    model's own forward (and its output) are unchanged. A patched model is read through an unpatched
    weight-sharing copy, because pruning would change the token sets.
    """
    if is_patched(model):
        raise ValueError("block_logits needs the unpruned model; call renyiprune.unpatch first")
    records: list[Tensor] = []

    def hook(attn: nn.Module, inputs: tuple) -> None:
        q, k, _ = attn.qkv_heads(inputs[0])
        records.append(attention_logits(q, k, attn.scale))

    handles = [blk.attn.register_forward_pre_hook(hook) for blk in model.blocks]
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    return records


def patch_entropy(logits: Tensor, alpha: float, num_patches: int | None = None, **options) -> Tensor:
    """Entropy H_alpha (nats) of each patch (B, n) as the renyi criterion sees it: minus its score.

    Default options: the patch query's row of logits, entropies averaged over heads, CLS key included.
    ``options`` (direction, heads, cls_key) go to the criterion unchanged.
    """
    n = logits.shape[-1] - 1 if num_patches is None else num_patches
    crit = make_criterion("renyi", **dict(options, alpha=alpha))
    return -crit(explicit_context(logits, Site(num_patches=n)))  # the pipeline's explicit case


def entropy_maps(
    logits: Sequence[Tensor], alphas: Sequence[float], blocks: Sequence[int], grid: tuple[int, int], **options
) -> dict[float, Tensor]:
    """Per-patch entropy on the patch grid for one image: {alpha: (len(blocks), gh, gw)}.

    ``logits`` are :func:`block_logits` of a single image (each (1, H, N, N)).
    """
    return {
        a: torch.stack([patch_entropy(logits[b], a, **options)[0].reshape(grid) for b in blocks])
        for a in alphas
    }


def head_entropy(logits: Tensor, alpha: float) -> Tensor:
    """Mean over patch queries of each head's row entropy H_alpha (B, H), CLS query left out."""
    from ..core.entropy import renyi_entropy

    return renyi_entropy(logits[:, :, 1:, :], alpha, dim=-1).mean(dim=-1)


@functools.lru_cache(maxsize=8)
def grid_distances(grid: tuple[int, int], patch_size: int) -> Tensor:
    """Euclidean distance in pixels between the centres of every pair of patches (n, n), row-major.

    Cached: the returned tensor is shared, do not modify it in place."""
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).double() * patch_size
    return torch.cdist(pos, pos)


def attention_distance(logits: Tensor, grid: tuple[int, int], patch_size: int) -> Tensor:
    """Mean attention distance per head (B, H) in pixels (Raghu et al. 2021).

    For each patch query i: sum_j a_ij * ||pos_i - pos_j|| over the patch keys j, where a_ij is the
    query's attention renormalized over patch keys (the CLS token has no position); then averaged over
    patch queries. Tokens after the grid (none in the unpruned model) are ignored.
    """
    n = grid[0] * grid[1]
    s = logits[:, :, 1 : 1 + n, 1 : 1 + n].double()
    a = s.softmax(dim=-1)
    d = grid_distances(grid, patch_size).to(a.device)
    return (a * d).sum(dim=-1).mean(dim=-1).float()


@dataclass(frozen=True)
class MaskSpec:
    """One row of the mask figure: a criterion with its options and a display label."""

    label: str
    criterion: str
    alpha: float = 1.0
    options: tuple[tuple[str, object], ...] = ()


def kept_counts(num_patches: int, keep_rate: float, stages: int, fuse: bool = False) -> list[int]:
    """Number of tokens kept after each of ``stages`` pruning stages (EViT's ceil rule). With ``fuse``
    (EViT's fusion) the fused token is a candidate from the second stage on (n = kept + 1), and a kept
    fused token counts among the kept."""
    out, n = [], num_patches
    for _ in range(stages):
        k = keep_count(n, keep_rate)
        out.append(k)
        n = k + 1 if fuse and k < n else k
    return out


@torch.inference_mode()
def prune_records(
    model: nn.Module,
    images: Tensor,
    spec: MaskSpec,
    keep_rate: float,
    locations: Sequence[int],
    fuse: bool = False,
) -> list[StageRecord]:
    """Run a patched weight-sharing copy of ``model`` on ``images``; its records, one per stage.

    ``model`` itself is untouched. Each record holds the survivors' original patch numbers
    (``patch_index``), the stage's scores and the indices it kept.
    """
    args = PatchArgs(keep_rate, spec.criterion, spec.alpha, tuple(locations), fuse,
                     options=dict(spec.options))
    view = pruned_view(model, build_plan(args))
    view(images)
    return list(view.renyiprune.records)


def masks_from_records(
    records: Sequence[StageRecord], num_patches: int, fuse: bool
) -> tuple[Tensor, Tensor]:
    """``kept`` (B, stages, num_patches) bool of surviving original patches, and ``fused`` (B, stages) the
    number of original patches inside each image's fused token after each stage (0 without fusion).

    A surviving fused token (``patch_index`` -1, EViT's fusion) is no original patch: it marks none."""
    B = records[0].patch_index.shape[0]
    kept = torch.zeros(B, len(records), num_patches + 1, dtype=torch.bool)  # last column: fused token
    for i, rec in enumerate(records):
        idx = rec.patch_index.cpu()
        kept[:, i].scatter_(1, torch.where(idx < 0, num_patches, idx), True)
    kept = kept[..., :num_patches]
    fused = num_patches - kept.sum(dim=-1) if fuse else torch.zeros(B, len(records), dtype=torch.long)
    return kept, fused


def pruning_masks(
    model: nn.Module,
    images: Tensor,
    spec: MaskSpec,
    keep_rate: float,
    locations: Sequence[int],
    fuse: bool = False,
) -> tuple[Tensor, Tensor]:
    """Which original patches survive each stage under ``spec``: :func:`masks_from_records` of a run."""
    records = prune_records(model, images, spec, keep_rate, locations, fuse)
    return masks_from_records(records, model.patch_embed.num_patches, fuse)


def stage_entropies(records: Sequence[StageRecord]) -> list[tuple[Tensor, Tensor]]:
    """Per stage of renyi pruning: (entropy of every candidate patch, kept mask), flattened over images.

    The entropies are minus the criterion's own scores at that stage (the tokens that reached it), and
    the kept mask is what that stage selected, so the two histograms split exactly as pruning did.
    Only meaningful for records of an entropy criterion (renyi, shannon), whose score is -H.
    """
    out = []
    for rec in records:
        h = -rec.scores.float()
        kept = torch.zeros_like(h, dtype=torch.bool).scatter_(1, rec.kept, True)
        out.append((h.flatten().cpu(), kept.flatten().cpu()))
    return out
