"""Keeping the top-scoring patch tokens and fusing the rest (EViT's token reorganization).

Token layout everywhere: [prefix_1 .. prefix_P, patch_1 .. patch_n, fused?], where the P >= 1 prefix
tokens (CLS first, then e.g. a distillation token) are always kept and never ranked or fused.
Selection works on whole batches with topk/gather; no Python loop over images or tokens.

Two fusion rules (``FUSIONS``):

* ``"evit"`` (default; EViT's official code): the fused token is the sum of the pruned tokens, each
  weighted by its *raw* CLS attention (head-mean softmax weight of the CLS query, not renormalized over
  the pruned set), appended last. At a later stage it is an ordinary candidate: counted in n, scored,
  kept, or pruned and fused again.
* ``"renorm"``: the pruned tokens' average weighted by their CLS attention renormalized to sum to 1;
  an earlier fused token is never ranked and always joins the new one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["FUSIONS", "check_fusion", "keep_count", "check_keep_rate", "select_tokens", "top_k_sorted"]

FUSIONS = ("evit", "renorm")


def check_keep_rate(keep_rate: float) -> float:
    """Return keep_rate as a float, or raise ValueError outside (0, 1]."""
    r = float(keep_rate)
    if not (0.0 < r <= 1.0):  # also rejects NaN
        raise ValueError(f"keep rate must be in (0, 1], got {keep_rate!r}")
    return r


def check_fusion(fusion: str | None) -> str:
    """The fusion rule's name (None: the default, ``"evit"``), or ValueError for an unknown one."""
    name = "evit" if fusion is None else fusion
    if name not in FUSIONS:
        raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}; got {fusion!r}")
    return name


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
    fusion: str = "evit",
) -> tuple[Tensor, Tensor]:
    """Keep the P prefix tokens and the k highest-scoring candidates of x, in order; fuse the rest.

    P = ``num_prefix`` (CLS, then e.g. a distillation token). With ``fusion="evit"`` every non-prefix
    token of x (B, P + n, C) is a candidate, a fused token of an earlier stage included, and ``scores``
    is (B, n); with ``fuse`` the pruned candidates become one token, sum_j a_j x_j with a_j the raw CLS
    attention ``cls_attn`` (B, P + n), appended last. With ``fusion="renorm"`` ``scores`` (B, n) ranks
    patches P..P+n-1 of x (B, P + n + f, C), a trailing fused token (f = 1) is never ranked, and with
    ``fuse`` the pruned patches and that token become their average weighted by the renormalized CLS
    attention. Returns the new tokens [prefix, kept, fused?] and the kept indices (B, k) into 0..n-1.
    """
    fusion = check_fusion(fusion)
    B, N, C = x.shape
    n = scores.shape[1]
    P = num_prefix
    has_fused = N - P - n
    if P < 1 or has_fused not in ((0,) if fusion == "evit" else (0, 1)):
        extra = "" if fusion == "evit" else " + at most one fused token"
        raise ValueError(f"{N} tokens do not fit {P} prefix token(s) + {n} scored tokens{extra}")
    kept = top_k_sorted(scores, k)
    fused = fuse and (k < n or has_fused)
    if fused and cls_attn is None:
        raise ValueError("fusion needs the CLS attention")
    # One row copy writes the prefix, the kept tokens and a slot for the fused token (filled below);
    # index_select on the (B N, C) rows copies whole rows, where gather reads an index per element.
    rows = [torch.arange(P, device=x.device).expand(B, P), kept + P, kept.new_zeros(B, int(fused))]
    flat = torch.cat(rows, dim=1) + N * torch.arange(B, device=x.device).unsqueeze(1)
    out = x.reshape(B * N, C).index_select(0, flat.view(-1)).view(B, -1, C)
    if fused:
        w = cls_attn[:, P:].to(x.dtype).clone()  # weights of the n candidates (and a carried fused token)
        w[:, :n].scatter_(1, kept, 0.0)  # kept tokens do not join the fused token
        if fusion == "renorm":
            w = w / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        out[:, -1] = torch.einsum("bn,bnc->bc", w, x[:, P:])
    return out, kept
