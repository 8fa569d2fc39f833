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

A pruning block computes only what its criterion declares it needs (``streamed.attend``: fused SDPA plus
the CLS row for EViT-like criteria, queries in chunks for entropies and column statistics), never the
(B, H, N, N) attention matrix; ``model.renyiprune.attention = "explicit"`` restores the explicit matrix
(also used under autograd and while exporting).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import FULL, AttentionContext, Needs, attention_logits, explicit_qkv, ranking_qkv
from .criteria import Criterion, standardize
from .merge_order import get_merge_order
from .merging import bipartite_matching, merge_into_kept
from .selection import select_tokens, top_k_sorted
from .state import PruneState, StageRecord
from .streamed import attend

__all__ = ["PruningBlock", "SizedBlock", "MergingBlock", "PrunedModel", "subclass"]


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast would cast the attention output to before the projection (None: no autocast):
    producing it directly rounds the same way and never holds a float32 copy of the output."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _streams(state: PruneState, x: Tensor) -> bool:
    """Whether a block may take the streamed path: not when asked for the explicit one, not with autograd
    through the attention (the chunks write into buffers), not while tracing or exporting."""
    if state.attention == "explicit" or (torch.is_grad_enabled() and x.requires_grad):
        return False
    return not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting())


def _pruning_attention(
    attn: nn.Module, x: Tensor, criterion: Criterion, ctx_kw: dict, bias: Tensor | None, state: PruneState
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Attention of a pruning block: (output, scores (B, n), cls_attn (B, N) or None, metric).

    Computes what the criterion declared (``criterion.needs``; the CLS row too when pruned tokens are
    fused) through ``streamed.attend``; the explicit matrix when the criterion needs it or the block may
    not stream (``_streams``). ``metric``: the head-mean keys (B, N, d) when pruned tokens are merged,
    else None; q, k, v (views of the whole qkv projection) are released before the output projection.
    """
    needs = getattr(criterion, "needs", FULL) | Needs(cls_row=state.removed == "fuse")
    merge = state.removed == "merge"
    if needs.full or not _streams(state, x):
        y, scores, cls_attn, keys = _scored_attention(attn, x, criterion, ctx_kw, bias)
        return y, scores, cls_attn, keys.mean(dim=1) if merge else None
    out_dtype = _autocast_dtype(x)
    (q, k, v), precision = ranking_qkv(attn, x)
    with precision:
        out, ctx = attend(q, k, v, attn.scale, needs, bias=bias, chunk_bytes=state.chunk_bytes,
                          out_dtype=out_dtype, **ctx_kw)  # fmt: skip
        with torch.no_grad():  # scores only rank tokens; no gradient flows through the ranking
            scores = criterion(ctx)
        cls_attn = ctx.cls_attn if needs.cls_row else None
    metric = k.mean(dim=1) if merge else None
    del q, k, v, ctx
    return attn.merge_heads(out), scores, cls_attn, metric


def _scored_attention(
    attn: nn.Module, x: Tensor, criterion: Criterion, ctx_kw: dict, bias: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Attention with explicit logits: returns (output, scores (B, n), cls_attn (B, N), keys).

    ``bias`` (proportional attention, log token sizes) is added to the logits; the criterion then
    reads the biased logits directly (the in-place fast path assumes logits = c q k^T).

    The logits are computed once; the criterion reads them (or cached views) first, then the same
    buffer becomes the probabilities in place for the output, so one (B, H, N, N) tensor is alive at
    a time. The built-in criteria derive their scores from those probabilities (``row_entropy``).
    """
    (q, k, v), (qf, kf, vf), precision = explicit_qkv(attn, x)
    with precision:
        logits = attention_logits(qf, kf, attn.scale)  # (B, H, N, N)
        if bias is None:
            ctx = AttentionContext(
                logits, **ctx_kw, query=qf, key=kf, value=vf, scale=attn.scale, reuse_logits=True
            )
        else:
            ctx = AttentionContext(logits.add_(bias.to(logits.dtype)), **ctx_kw, key=kf, value=vf)
        del logits  # the context owns the buffer
        with torch.no_grad():  # scores only rank tokens; no gradient flows through the ranking
            scores = criterion(ctx)
        out = ctx.probs @ vf
        cls_attn = ctx.cls_attn
    return attn.merge_heads(out.to(v.dtype)), scores, cls_attn, k


class PruningBlock:
    """Mixin placed before a Block class: attention, residual, token selection, then the MLP."""

    _renyiprune: PruneState
    _renyiprune_stage: int

    def forward(self, x: Tensor) -> Tensor:
        state = self._renyiprune
        cfg = state.stages[self._renyiprune_stage]
        n = state.patch_index.shape[1]
        y, scores, cls_attn, metric = _pruning_attention(
            self.attn,
            self.norm1(x),
            cfg.criterion,
            dict(num_patches=n, stage=self._renyiprune_stage, step=state.step, num_prefix=state.num_prefix),
            state.key_bias(),
            state,
        )
        x = x + self.drop_path1(y)
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


# The built-in merge orders (merge_order.py) from a streamed context: (needs, score) for an order alpha;
# the same formulas as their explicit versions, which take the full logits.
_STREAMED_ORDERS = {
    "entropy": (lambda a: Needs(row_entropy=(a,)), lambda ctx, a: ctx.row_entropy(a).mean(dim=1)),
    "cls_attention": (lambda a: Needs(cls_row=True), lambda ctx, a: ctx.cls_attn.neg()),
}


def _entropy_attention(attn: nn.Module, x: Tensor, bias: Tensor | None, state: PruneState):
    """Attention that also returns a merge-order bonus for the A tokens (even positions): entropy_weight x
    the state's merge order (default: the z-scored Rényi row entropy, mean over heads). The built-in
    orders stream (``streamed.attend`` over every token); others get the explicit logits. As in a
    pruning block, float16/bfloat16 ranking attention runs in float32 here."""
    order = _STREAMED_ORDERS.get(state.merge_order)
    if order is not None and _streams(state, x):
        needs, score = order
        out_dtype = _autocast_dtype(x)
        (q, k, v), precision = ranking_qkv(attn, x)
        with precision:
            out, ctx = attend(q, k, v, attn.scale, needs(state.entropy_alpha), bias=bias, num_prefix=0,
                              chunk_bytes=state.chunk_bytes, out_dtype=out_dtype)  # fmt: skip
            with torch.no_grad():
                z = standardize(score(ctx, state.entropy_alpha), eps=1e-6)  # as merge_order.py
        bonus = (state.entropy_weight * z[:, ::2]).to(q.dtype)
        del ctx, q, v
        return attn.merge_heads(out), k, bonus
    (q, k, v), (qf, kf, vf), precision = explicit_qkv(attn, x)
    with precision:
        logits = attention_logits(qf, kf, attn.scale)
        if bias is not None:
            logits = logits.add_(bias.to(logits.dtype))
        with torch.no_grad():
            z = get_merge_order(state.merge_order)(logits, state.entropy_alpha)  # (B, N)
        out = logits.softmax(dim=-1) @ vf
    return attn.merge_heads(out.to(v.dtype)), k, (state.entropy_weight * z[:, ::2]).to(q.dtype)


class PrunedModel:
    """Mixin placed before the model class: resets the per-forward state, then runs the model."""

    renyiprune: PruneState

    def forward(self, x: Tensor) -> Tensor:
        state = self.renyiprune
        state.begin(x.shape[0], self.patch_embed.num_patches, x.device)
        out = super().forward(x)
        state.step += 1
        return out


def subclass(mixin: type, cls: type) -> type:
    """``cls`` with ``mixin`` first in its bases, named Pruning<cls>."""
    return type(f"Pruning{cls.__name__}", (mixin, cls), {})
