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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttentionContext, attention_logits, explicit_qkv
from .criteria import Criterion
from .merge_order import get_merge_order
from .merging import bipartite_matching, merge_into_kept
from .selection import select_tokens, top_k_sorted
from .state import PruneState, StageRecord

__all__ = ["PruningBlock", "SizedBlock", "MergingBlock", "PrunedModel", "subclass"]


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
        y, scores, cls_attn, keys = _scored_attention(
            self.attn,
            self.norm1(x),
            cfg.criterion,
            dict(num_patches=n, stage=self._renyiprune_stage, step=state.step, num_prefix=state.num_prefix),
            bias=state.key_bias(),
        )
        x = x + self.drop_path1(y)
        k = cfg.keep(n)
        if state.removed == "merge":
            kept = top_k_sorted(scores, k)
            x, state.size = merge_into_kept(x, state.sizes(x), keys.mean(dim=1), kept, n, state.num_prefix)
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
        x = x + self.drop_path1(y)
        if r > 0:
            matching = bipartite_matching(keys.mean(dim=1), r, bonus=bonus, num_prefix=state.num_prefix)
            x, state.size = matching.merge(x, state.sizes(x))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def _entropy_attention(attn: nn.Module, x: Tensor, bias: Tensor | None, state: PruneState):
    """Explicit attention that also returns a merge-order bonus for the A tokens (even positions):
    entropy_weight x the state's merge order (default: the z-scored Rényi row entropy, mean over heads).
    As in a pruning block, float16/bfloat16 attention runs in float32 here."""
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
