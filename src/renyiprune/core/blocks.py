"""The block mixins a patched model runs: pruning, merging (ToMe) and proportional attention.

Like ToMe's ``tome.patch.timm``, patching swaps the classes of the model and of the blocks at the
pruning locations for subclasses with one of these mixins first (``core.api``); all configuration and
the records of the last forward live in one ``PruneState`` object at ``model.renyiprune``, shared by
those blocks. Nothing is copied, so the weights stay the user's.

After a forward, ``model.renyiprune.records[i]`` holds, for the i-th pruning location:
``kept`` (B, k) indices into that stage's n candidate tokens, ``patch_index`` (B, k) the original
patch numbers (0..num_patches-1, row-major on the grid) of the survivors, and ``scores`` (B, n).
With EViT's fusion (``fusion="evit"``, the default) a fused token of an earlier stage is a candidate
too (the last of the n); when it survives, its ``patch_index`` is -1 (it is no original patch).

A pruning block computes only what its criterion declares it needs, through the one pipeline
(``streamed.score_block`` -> ``streamed.attend``: fused SDPA plus the CLS row for EViT-like criteria,
queries in chunks sized by a cost model for entropies and column statistics, the explicit matrix for
``Needs(full=True)``); ``model.renyiprune.attention = "explicit"`` asks for the explicit matrix (also
used under autograd and while exporting).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import FULL, Needs, Site
from .merge_order import get_merge_order, merge_order_needs
from .merging import bipartite_matching, merge_into_kept
from .selection import select_tokens, top_k_sorted
from .state import PruneState, StageRecord
from .streamed import may_stream, score_block

__all__ = ["PruningBlock", "SizedBlock", "MergingBlock", "PrunedModel", "subclass"]


def _streams(state: PruneState, x: Tensor) -> bool:
    """Whether a block may compute its attention in chunks: not when asked for the explicit one, and
    not where ``streamed.may_stream`` says no (autograd through the attention, tracing, export)."""
    return state.attention != "explicit" and may_stream(x)


def _site(state: PruneState, x: Tensor, **layout) -> Site:
    """The ``Site`` a patched block scores at: the state's chunk override, explicit switch and ranking
    projection."""
    if state.ranking_projection not in ("native", "float32"):
        raise ValueError(f"model.renyiprune.ranking_projection must be 'native' or 'float32', "
                         f"got {state.ranking_projection!r}")
    return Site(chunk_bytes=state.chunk_bytes, explicit=not _streams(state, x),
                float32_projection=state.ranking_projection == "float32", **layout)  # fmt: skip


class PruningBlock:
    """Mixin placed before a Block class: attention, residual, token selection, then the MLP."""

    _renyiprune: PruneState
    _renyiprune_stage: int

    def forward(self, x: Tensor) -> Tensor:
        state = self._renyiprune
        cfg = state.stages[self._renyiprune_stage]
        n = state.candidates().shape[1]
        h = self.norm1(x)
        site = _site(state, h, num_patches=n, stage=self._renyiprune_stage, step=state.step,
                     num_prefix=state.num_prefix)  # fmt: skip
        needs = getattr(cfg.criterion, "needs", FULL) | Needs(cls_row=state.removed == "fuse")
        y, scores, ctx, keys = score_block(self.attn, h, cfg.criterion, site, state.key_bias(), needs)
        cls_attn = ctx.cls_attn if needs.cls_row else None
        metric = keys.mean(dim=1) if state.removed == "merge" else None
        del h, ctx, keys  # q, k, v (views of the whole qkv projection) go before the MLP
        x = x + self.drop_path1(y)
        del y  # (B, N, C): the MLP below runs on the kept tokens only, so must not hold it
        k = cfg.keep(n)
        if state.removed == "merge":
            kept = top_k_sorted(scores, k)
            x, state.size = merge_into_kept(x, state.size, metric, kept, n, state.num_prefix)
        else:
            x, kept = select_tokens(x, scores, k, cls_attn=cls_attn, fuse=state.removed == "fuse",
                                    num_prefix=state.num_prefix, fusion=state.fusion)  # fmt: skip
        survivors = state.patch_index.gather(1, kept)
        fused = x.shape[1] - state.num_prefix - k
        state.records.append(StageRecord(cfg.location, kept, survivors, scores, num_fused=fused))
        if fused and state.fusion == "evit":  # the new fused token is a candidate at the next stage
            survivors = torch.cat([survivors, survivors.new_full((survivors.shape[0], 1), -1)], dim=1)
        state.patch_index = survivors
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def _biased_attention(attn: nn.Module, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Fused attention with an additive key bias (proportional attention); returns (output, keys)."""
    q, k, v = attn.qkv_heads(x)
    mask = None if bias is None else bias.to(q.dtype)
    return attn.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)), k


class SizedBlock:
    """Mixin for blocks after a merge: the same block, with proportional attention."""

    _renyiprune: PruneState

    def forward(self, x: Tensor) -> Tensor:
        state = self._renyiprune
        if state.size is None:
            return super().forward(x)
        y, _ = _biased_attention(self.attn, self.norm1(x), state.key_bias())
        x = x + self.drop_path1(y)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MergingBlock:
    """Mixin for ToMe: attention (proportional), then merge r tokens by bipartite soft matching."""

    _renyiprune: PruneState
    _renyiprune_block: int

    def forward(self, x: Tensor) -> Tensor:
        state = self._renyiprune
        r = state.merge_r[self._renyiprune_block]
        bonus = None
        if r > 0 and state.entropy_weight:
            y, keys, bonus = _entropy_attention(self.attn, self.norm1(x), state.key_bias(), state)
        else:
            y, keys = _biased_attention(self.attn, self.norm1(x), state.key_bias())
        metric = keys.mean(dim=1) if r > 0 else None
        del keys  # a view of the whole qkv projection
        x = x + self.drop_path1(y)
        if r > 0:
            matching = bipartite_matching(metric, r, bonus=bonus, num_prefix=state.num_prefix)
            x, state.size = matching.merge(x, state.size)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def _entropy_attention(attn: nn.Module, x: Tensor, bias: Tensor | None, state: PruneState):
    """Attention that also returns a merge-order bonus for the A tokens (even positions): entropy_weight x
    the state's merge order (default: the z-scored Rényi row entropy, mean over heads), scored over every
    token (``num_prefix=0``) by the same pipeline as a pruning block, with the order's declared needs."""
    order = functools.partial(get_merge_order(state.merge_order), alpha=state.entropy_alpha)
    needs = merge_order_needs(state.merge_order, state.entropy_alpha)
    site = _site(state, x, num_patches=x.shape[1], num_prefix=0)
    y, z, ctx, keys = score_block(attn, x, order, site, bias, needs)
    del ctx
    return y, keys, (state.entropy_weight * z[:, ::2]).to(keys.dtype)


class PrunedModel:
    """Mixin placed before the model class: resets the per-forward state, then runs the model."""

    renyiprune: PruneState

    def forward(self, x: Tensor) -> Tensor:
        state = self.renyiprune
        state.begin(x.shape[0], self.patch_embed.num_patches, x.device)
        out = super().forward(x)
        state.end()
        return out


def subclass(mixin: type, cls: type) -> type:
    """``cls`` with ``mixin`` first in its bases, named Pruning<cls>."""
    return type(f"Pruning{cls.__name__}", (mixin, cls), {})
