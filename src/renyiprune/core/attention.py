"""What a criterion sees at a pruning block, and what it declares it needs.

``Needs`` is a criterion's declaration of what it reads (row entropies, the CLS row, column statistics,
keys, values, or the full attention), so that a pruning block computes only that (``streamed.attend``).
``AttentionContext`` holds one block's explicit logits (and, from a pruning block, its queries, keys and
values) and computes the probabilities, CLS attention, row entropies and column statistics at most once,
so that criteria share them. Nothing here knows about models or the registry of criteria.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from .entropy import check_alpha, renyi_entropy

__all__ = ["AttentionContext", "Needs", "FULL", "attention_logits", "explicit_qkv", "ranking_qkv"]


@dataclass(frozen=True)
class Needs:
    """What a criterion reads from a pruning block's attention; the block computes only that.

    ``row_entropy``: Rényi orders of the per-head row entropies (``ctx.row_entropy``); ``cls_row``: each
    head's CLS-query row (``ctx.cls_rows`` / ``ctx.cls_attn``); ``received``: the per-head attention each
    token receives, mean over queries (``ctx.received``); ``column_norm``: orders n of the l_n norms of the
    head-mean attention columns (``ctx.column_norm``); ``mean_attention``: the head-mean (B, N, N)
    attention (``ctx.mean_attention``); ``key`` / ``value``: the block's keys / values; ``full``: the
    explicit (B, H, N, N) logits and probabilities (``ctx.logits`` / ``ctx.probs``), for anything else.
    Needs combine with ``|``.
    """

    row_entropy: tuple[float, ...] = ()
    cls_row: bool = False
    received: bool = False
    column_norm: tuple[float, ...] = ()
    mean_attention: bool = False
    key: bool = False
    value: bool = False
    full: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "row_entropy", tuple(sorted({check_alpha(a) for a in self.row_entropy})))
        object.__setattr__(self, "column_norm", tuple(sorted({float(n) for n in self.column_norm})))

    def __or__(self, other: Needs) -> Needs:
        merged = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            merged[f.name] = a + b if isinstance(a, tuple) else a or b
        return Needs(**merged)

    @property
    def per_query(self) -> bool:
        """Whether the block must look at every query's row (entropies or column statistics)."""
        return bool(self.row_entropy or self.received or self.column_norm or self.mean_attention)


FULL = Needs(full=True)  # what an undeclared criterion gets: the explicit attention, as before


class AttentionContext:
    """What a criterion may read at a pruning block.

    ``logits``: (B, H, N, N) attention logits q.k/sqrt(d) before softmax, queries x keys; tokens
    0..P-1 are the ``num_prefix`` prefix tokens (token 0 is CLS, then e.g. a distillation token), never
    candidates; tokens P..P+n-1 are the candidate patches, a fused token (if any) comes last.

    A pruning block also passes its queries, keys and scale (``attention_logits``) and lets
    the context turn the logits buffer into the probabilities in place, so that the block holds one
    (B, H, N, N) tensor at a time and ``row_entropy`` is derived from the probabilities without another
    pass over the logits. Reading ``logits`` after that recomputes them (same matmul, same values).
    """

    def __init__(
        self,
        logits: Tensor,
        num_patches: int,
        stage: int = 0,
        step: int = 0,
        *,
        query: Tensor | None = None,
        key: Tensor | None = None,
        value: Tensor | None = None,
        scale: float = 1.0,
        reuse_logits: bool = False,
        num_prefix: int = 1,
    ):
        self._logits: Tensor | None = logits
        self.num_patches = num_patches
        self.num_prefix = num_prefix  # prefix tokens (CLS, distillation, ...) before the patches
        self.stage = stage
        self.step = step
        self._query = query
        self._key = key
        self._value = value
        self._scale = scale  # logits = (query @ key^T) * scale
        # In-place softmax needs a way to get the logits back, and no autograd graph through them.
        self._reuse = reuse_logits and query is not None and key is not None and not logits.requires_grad
        self._probs: Tensor | None = None
        self._lse: Tensor | None = None  # (B, H, N) log-sum-exp of each logits row, when known
        self._cls_rows: Tensor | None = None
        self._entropy: dict[float, Tensor] = {}

    def __repr__(self) -> str:
        shape = tuple((self._logits if self._logits is not None else self._probs).shape)
        return f"AttentionContext(logits={shape}, num_patches={self.num_patches}, stage={self.stage})"

    @property
    def logits(self) -> Tensor:
        """The attention logits (B, H, N, N); once a criterion has read them they are never overwritten."""
        if self._logits is None:  # became the probabilities in place: recompute
            self._logits = attention_logits(self._query, self._key, self._scale)
        self._reuse = False
        return self._logits

    @property
    def probs(self) -> Tensor:
        """softmax(logits) over keys (B, H, N, N), computed once and shared with the attention output."""
        if self._probs is None:
            s = self._logits if self._logits is not None else self.logits
            if not self._reuse:
                self._probs = s.softmax(dim=-1)
            elif s.dtype in (torch.float32, torch.float64):
                self._probs = torch.softmax(s, dim=-1, out=s)  # in place: one N x N buffer
                self._logits = None
            else:  # float16/bfloat16 (autocast): in place too, with the normalizer summed in float32
                self._softmax_keeping_lse(s)
        return self._probs

    def _softmax_keeping_lse(self, s: Tensor) -> None:
        """In-place softmax of the logits buffer in steps (max, exp, sum, divide) that also leave the
        row log-sum-exp L = max + log(sum); Shannon entropy needs L, and a fused softmax discards it."""
        m = s.amax(dim=-1, keepdim=True)
        s.sub_(m).exp_()
        z = s.sum(dim=-1, keepdim=True, dtype=_acc_dtype(s))
        self._probs = s.div_(z)
        self._lse = (m.to(z.dtype) + z.log()).squeeze(-1)
        self._logits = None

    def probs_and_lse(self) -> tuple[Tensor, Tensor | None]:
        """The probabilities and, where the in-place softmax can provide it, the row log-sum-exp."""
        if self._probs is None and self._reuse:
            self._softmax_keeping_lse(self._logits if self._logits is not None else self.logits)
        return self.probs, self._lse

    @property
    def batch_size(self) -> int:
        return self._any_attention().shape[0]

    @property
    def device(self) -> torch.device:
        return self._any_attention().device

    def _any_attention(self) -> Tensor:
        return self._logits if self._logits is not None else self._probs

    @property
    def cls_rows(self) -> Tensor:
        """Each head's CLS query (token 0) attention to every token, prefix included (B, H, N); float32
        for float16/bfloat16 attention, its own dtype otherwise."""
        if self._cls_rows is None:
            s = self._logits if self._logits is not None else None
            row = self._probs[:, :, 0] if self._probs is not None else s[:, :, 0].softmax(-1)
            self._cls_rows = row.to(_acc_dtype(row))
        return self._cls_rows

    @property
    def received(self) -> Tensor:
        """Attention each token receives per head, mean over the queries (B, H, N), prefix included."""
        p = self.probs
        return p.to(_acc_dtype(p)).mean(dim=2)

    @property
    def mean_attention(self) -> Tensor:
        """The head-mean attention (B, N queries, N keys)."""
        p = self.probs
        return p.to(_acc_dtype(p)).mean(dim=1)

    def column_norm(self, n: float) -> Tensor:
        """l_n norm of every key's column (over queries) of the head-mean attention (B, N), prefix included.

        Scaled by the column maximum so that p^n cannot underflow to 0 for small attention.
        """
        cols = self.mean_attention
        if math.isinf(n):
            return cols.amax(dim=1)
        peak = cols.amax(dim=1, keepdim=True).clamp_min(torch.finfo(cols.dtype).tiny)
        return peak.squeeze(1) * (cols / peak).pow(n).sum(dim=1).pow(1.0 / n)

    @property
    def cls_attn(self) -> Tensor:
        """Mean over heads of the CLS query's attention to every token, prefix included (B, N)."""
        return self.cls_rows.mean(dim=1)

    @property
    def key(self) -> Tensor:
        """The block's keys (B, H, N, d), for criteria that compare tokens by what they match on."""
        if self._key is None:
            raise ValueError("this criterion needs the attention keys; pass key= to AttentionContext")
        return self._key

    @property
    def value(self) -> Tensor:
        """The block's values (B, H, N, d), for criteria that weigh attention by what it carries."""
        if self._value is None:
            raise ValueError("this criterion needs the attention values; pass value= to AttentionContext")
        return self._value

    def patches(self, t: Tensor, dim: int = -1) -> Tensor:
        """Slice the candidate patch tokens P..P+n-1 out of ``t`` along ``dim`` (P = ``num_prefix``)."""
        return t.narrow(dim, self.num_prefix, self.num_patches)

    def row_entropy(self, alpha: float) -> Tensor:
        """Per-head Rényi entropy H_alpha of each candidate patch's attention row (B, H, n).

        Cached per alpha. With the block's queries and keys it comes from the probabilities that the
        attention output uses (``_row_entropy_from_probs``); otherwise from the logits by log-sum-exp.
        """
        a = check_alpha(alpha)
        if a not in self._entropy:
            fast = self._reuse or (self._probs is not None and self._query is not None)
            h = _row_entropy_from_probs(self, a) if fast else None
            if h is None:
                s = self._logits if self._logits is not None else self.logits
                h = renyi_entropy(self.patches(s, dim=2), a, dim=-1)
            self._entropy[a] = h
        return self._entropy[a]


def attention_logits(query: Tensor, key: Tensor, scale: float) -> Tensor:
    """(query @ key^T) * scale, the scale applied in place: the one formula blocks and contexts share."""
    return torch.matmul(query, key.transpose(-2, -1)).mul_(scale)


def ranking_qkv(attn: nn.Module, x: Tensor) -> tuple[tuple[Tensor, ...], contextlib.AbstractContextManager]:
    """The block's (q, k, v) and the context its ranking attention runs in.

    Rankings are sensitive to rounding: in float16/bfloat16 (weights or autocast) the ranking attention
    runs in float32 with autocast off (bfloat16 logits of magnitude ~10 are rounded to 1/16); under
    autocast the q, k, v projection runs in float32 as well.
    """
    full = torch.autocast(x.device.type, enabled=False)
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        # Autocast over float32 weights: project in float32 too, so that q and k carry no bfloat16
        # rounding (~0.4 % of each logit) into the ranking.
        with full:
            return attn.qkv_heads(x), full
    q, k, v = attn.qkv_heads(x)
    if q.dtype not in (torch.float16, torch.bfloat16):
        return (q, k, v), contextlib.nullcontext()
    return (q, k, v), full


def explicit_qkv(attn: nn.Module, x: Tensor) -> tuple[tuple, tuple, contextlib.AbstractContextManager]:
    """(q, k, v), the float32 (q, k, v) the explicit attention runs on, and the context to run it in."""
    (q, k, v), precision = ranking_qkv(attn, x)
    if q.dtype not in (torch.float16, torch.bfloat16):
        return (q, k, v), (q, k, v), precision
    return (q, k, v), (q.float(), k.float(), v.float()), precision


def _acc_dtype(t: Tensor) -> torch.dtype:
    """float32 for float16/bfloat16 (as ``renyi_entropy``), the tensor's own dtype otherwise."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _row_entropy_from_probs(ctx: AttentionContext, a: float) -> Tensor | None:
    """H_alpha of the patch rows from the probabilities p = softmax(s), s = c q k^T; None where unsafe.

    No (B, H, n, N) temporary: every term is a row reduction of p or a product with q, k:
      H_inf = -log max_j p_j
      H_1   = L - sum_j p_j s_j, with sum_j p_j s_j = c q.(p K) and L = log sum_j exp s_j kept by the
              in-place softmax (else L = s_j* - log p_j*, j* = argmax p)
      H_a   = a/(1-a) log ||p||_a  (a != 1; only where p^a cannot underflow and |a-1| >= 0.5)
    """
    n = ctx.num_patches
    keys = n + ctx.num_prefix + 1  # at most: prefix, patches and a fused token
    if a not in (1.0, math.inf) and (abs(a - 1.0) < 0.5 or a == 0.0 or a * math.log(keys) > 60.0):
        return None  # the log-sum-exp form is exact there
    probs, lse = ctx.probs_and_lse() if a == 1.0 else (ctx.probs, None)
    p = ctx.patches(probs, dim=2)  # (B, H, n, N)
    acc = _acc_dtype(p)
    if a == 2.0 or (a != 1.0 and not math.isinf(a)):
        norm = torch.linalg.vector_norm(p, ord=a, dim=-1, dtype=acc)
        return norm.log() * (a / (1.0 - a))
    if math.isinf(a):
        return p.amax(dim=-1).to(acc).log().neg_()  # amax: no argmax indices needed
    q = ctx.patches(ctx._query, dim=2)  # (B, H, n, d)
    k = ctx._key
    if lse is not None:  # H_1 = L - c q.(p K)
        dot = (p @ k).to(acc).mul_(q).sum(dim=-1).mul_(ctx._scale)
        return ctx.patches(lse, dim=2).to(acc) - dot
    pmax, jmax = p.max(dim=-1)
    log_pmax = pmax.to(acc).log()
    k_star = k.gather(2, jmax.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])).to(acc)  # key of argmax
    expected_k = (p @ k).to(acc)  # sum_j p_j k_j
    # L - sum_j p_j s_j = c q.(k_j* - sum_j p_j k_j) - log p_j*   (in place: two (B, H, n, d) buffers)
    dot = k_star.sub_(expected_k).mul_(q).sum(dim=-1)
    return dot.mul_(ctx._scale).sub_(log_pmax)
