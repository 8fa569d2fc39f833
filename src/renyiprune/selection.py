"""Keeping the top-scoring patch tokens and fusing the rest (EViT's token reorganization).

Token layout everywhere: [prefix_1 .. prefix_P, patch_1 .. patch_n, fused?], where the P >= 1 prefix
tokens (CLS first, then e.g. a distillation token) are always kept and never ranked or fused.
Selection works on whole batches with topk/gather; no Python loop over images or tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["keep_count", "check_keep_rate", "select_tokens", "top_k_sorted"]


def check_keep_rate(keep_rate: float) -> float:
    """Return keep_rate as a float, or raise ValueError outside (0, 1]."""
    r = float(keep_rate)
    if not (0.0 < r <= 1.0):  # also rejects NaN
        raise ValueError(f"keep rate must be in (0, 1], got {keep_rate!r}")
    return r


def keep_count(n: int, keep_rate: float) -> int:
    """ceil(r * n), at least 1; r*n is rounded first so that 0.7 * 10 keeps 7, not 8."""
    return max(1, min(n, math.ceil(round(check_keep_rate(keep_rate) * n, 6))))


def top_k_sorted(scores: Tensor, k: int) -> Tensor:
    """Indices (B, k) of the k highest scores per row, in ascending (original token) order."""
    return scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values


def select_tokens(
    x: Tensor,
    scores: Tensor,
    k: int,
    *,
    cls_attn: Tensor | None = None,
    fuse: bool = False,
    num_prefix: int = 1,
) -> tuple[Tensor, Tensor]:
    """Keep the P prefix tokens and the k highest-scoring patches of x (B, P + n + f, C), in order.

    P = ``num_prefix`` (CLS, then e.g. a distillation token). ``scores`` (B, n) ranks patches
    P..P+n-1; a trailing fused token (f = 1) is never ranked. With ``fuse`` the pruned patches,
    together with any earlier fused token, become one fused token (last): their average weighted by
    the CLS attention ``cls_attn`` (B, P + n + f) (EViT's rule). Returns the new tokens
    [prefix, kept patches, fused?] and the kept indices (B, k) into patches 0..n-1.
    """
    B, N, C = x.shape
    n = scores.shape[1]
    P = num_prefix
    has_fused = N - P - n
    if P < 1 or has_fused not in (0, 1):
        raise ValueError(
            f"{N} tokens do not fit {P} prefix token(s) + {n} scored patches + at most one fused token"
        )
    kept = top_k_sorted(scores, k)
    patches = x[:, P : P + n]
    kept_tokens = patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, C))
    parts = [x[:, :P], kept_tokens]
    if fuse and (k < n or has_fused):
        if cls_attn is None:
            raise ValueError("fusion needs the CLS attention")
        w = cls_attn[:, P:].to(x.dtype).clone()  # weights of the n patches and the old fused token
        w[:, :n].scatter_(1, kept, 0.0)  # kept patches do not join the fused token
        w = w / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        parts.append(torch.einsum("bn,bnc->bc", w, x[:, P:]).unsqueeze(1))
    return torch.cat(parts, dim=1), kept
