"""What a criterion sees at a pruning block, what it declares it needs, and how each statistic is made.

``Needs`` is a criterion's declaration of what it reads (row entropies, the CLS row, column statistics,
keys, values, or the full attention), so that a pruning block computes only that (``streamed.attend``).
``Statistics`` computes every declarable statistic from probabilities, one chunk of queries at a time:
the streamed chunks and an explicit context both use it. A new statistic is written where its criterion
is: ``register_statistic(name, start, fold)`` there, ``Needs(statistics=(name,))`` in the criterion's
declaration and ``ctx.statistic(name)`` in its body; the pipeline folds it chunk by chunk like the
built-in ones, and nothing in this package changes (tests/unit/test_streamed_attention.py does it).
``AttentionContext`` holds one block's explicit logits and computes what criteria read at most once.
Nothing here knows about models or the registry of criteria.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from .entropy import (
    SHANNON_TEMP_SHARE,
    accumulation_dtype,
    check_alpha,
    entropy_from_probs,
    renyi_entropy,
    safe_from_probs,
)

__all__ = [
    "AttentionContext", "Needs", "FULL", "Operands", "Site", "Statistics", "Chunk", "attention_logits",
    "softmax_in_place", "explicit_qkv", "ranking_qkv", "Statistic", "STATISTICS", "register_statistic",
]  # fmt: skip


@dataclass(frozen=True)
class Needs:
    """What a criterion reads from a pruning block's attention; the block computes only that.

    ``row_entropy``: Rényi orders of the per-head row entropies (``ctx.row_entropy``); ``cls_row``: each
    head's CLS-query row (``ctx.cls_rows`` / ``ctx.cls_attn``); ``received``: the per-head attention each
    token receives, mean over queries (``ctx.received``); ``column_norm``: orders n of the l_n norms of the
    head-mean attention columns (``ctx.column_norm``); ``mean_attention``: the head-mean (B, N, N)
    attention (``ctx.mean_attention``); ``key`` / ``value``: the block's keys / values; ``full``: the
    explicit (B, H, N, N) logits and probabilities (``ctx.logits`` / ``ctx.probs``), for anything else;
    ``statistics``: names of statistics registered with ``register_statistic`` (``ctx.statistic(name)``).
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
    statistics: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "row_entropy", tuple(sorted({check_alpha(a) for a in self.row_entropy})))
        object.__setattr__(self, "column_norm", tuple(sorted({float(n) for n in self.column_norm})))
        names = (self.statistics,) if isinstance(self.statistics, str) else self.statistics
        object.__setattr__(self, "statistics", tuple(sorted(set(names))))

    def __or__(self, other: Needs) -> Needs:
        merged = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            merged[f.name] = a + b if isinstance(a, tuple) else a or b
        return Needs(**merged)

    @property
    def per_query(self) -> bool:
        """Whether the block must look at every query's row (entropies or column statistics)."""
        return bool(self.row_entropy or self.received or self.column_norm or self.mean_attention
                    or self.statistics)  # fmt: skip


FULL = Needs(full=True)  # what an undeclared criterion gets: the explicit attention, as before


@dataclass
class Operands:
    """What a block's attention is computed from: logits = (query @ key^T) * scale + bias.

    ``bias`` (B, 1, 1, N) is added to every row (proportional attention: log token sizes; -inf masks a
    key). ``streamed.attend`` may replace the tensors with contiguous copies, which releases the views of
    the block's qkv projection that the caller passed in.
    """

    query: Tensor | None = None
    key: Tensor | None = None
    value: Tensor | None = None
    scale: float = 1.0
    bias: Tensor | None = None

    def logits(self) -> Tensor:
        """The (B, H, N, N) logits, bias included."""
        s = attention_logits(self.query, self.key, self.scale)
        return s if self.bias is None else s.add_(self.bias.to(s.dtype))


@dataclass(frozen=True)
class Site:
    """Where a block's attention is scored (token layout, stage, forward step) and how.

    ``num_patches`` defaults to the tokens after the ``num_prefix`` prefix tokens. ``chunk_bytes``
    replaces the cost model (``streamed.memory_budget``, ``CACHE_BYTES``) with one byte budget for the
    chunk buffers; ``explicit`` asks for the full (B, H, N, N) attention (autograd, tracing, export,
    ``attention="explicit"``). ``out_dtype``: dtype of the attention output (default: the values').
    ``float32_projection``: see ``ranking_qkv`` (``PruneState.ranking_projection = "float32"``).
    """

    num_patches: int | None = None
    num_prefix: int = 1
    stage: int = 0
    step: int | Tensor = 0  # forwards run so far (PruneState.step: a 0-d tensor)
    chunk_bytes: int | None = None
    out_dtype: torch.dtype | None = None
    explicit: bool = False
    float32_projection: bool = False  # under autocast, project q, k, v in float32 (``ranking_qkv``)


@dataclass(frozen=True)
class Statistic:
    """A statistic registered by name (``register_statistic``), folded over the chunks of queries.

    ``start(B, H, N, dtype=, device=)`` returns its initial state, ``fold(state, chunk)`` folds one ``Chunk``
    in and returns the new state, ``finish(state)`` (default: none) gives what ``ctx.statistic(name)``
    returns. Chunks arrive as (images, query rows) blocks in any order a cost model picks, and an explicit
    context folds the whole (B, H, N, N) probabilities as one chunk.
    """

    start: Callable
    fold: Callable
    finish: Callable | None = None  # None: the state itself

    def result(self, state):
        return state if self.finish is None else self.finish(state)


STATISTICS: dict[str, Statistic] = {}


def register_statistic(
    name: str, start: Callable, fold: Callable, finish: Callable | None = None
) -> Statistic:
    """Make a statistic declarable as ``Needs(statistics=(name,))``; see ``Statistic``."""
    STATISTICS[name] = Statistic(start, fold, finish)
    return STATISTICS[name]


def _registered(name: str) -> Statistic:
    if name not in STATISTICS:
        raise ValueError(f"unknown statistic {name!r}: register it with register_statistic; known: "
                         f"{', '.join(sorted(STATISTICS)) or 'none'}")  # fmt: skip
    return STATISTICS[name]


@dataclass
class Chunk:
    """Probabilities of query rows ``rows`` of images ``images`` (b, H, c, N), and what they came from:
    the chunk's queries (b, H, c, d), the images' keys (b, H, N, d) and key bias, for registered
    statistics that read them."""

    probs: Tensor
    images: slice
    rows: slice
    query: Tensor | None = None
    key: Tensor | None = None
    scale: float = 1.0
    bias: Tensor | None = None


class Statistics:
    """Every statistic a criterion may declare, for (B, H, N) attention, folded chunk by chunk.

    The one place where row entropies, the CLS rows, the attention received, the head-mean attention
    and the column norms are computed: ``streamed.attend`` folds its chunks in, an explicit context
    folds its whole probability tensor as one chunk. ``result`` names each by its ``Needs`` field.
    """

    def __init__(self, needs: Needs, shape: tuple[int, int, int], like: Tensor):
        B, H, N = shape
        new = dict(dtype=accumulation_dtype(like), device=like.device)
        self.needs, self.num_keys = needs, N
        self.entropy = {a: torch.empty(B, H, N, **new) for a in needs.row_entropy}
        self.cls = torch.empty(B, H, N, **new) if needs.cls_row else None
        self.received = torch.zeros(B, H, N, **new) if needs.received else None
        self.mean_attention = torch.empty(B, N, N, **new) if needs.mean_attention else None
        # l_n column norms, online (Eq. col): running column maximum m and sum of (p / m)^n
        self.peak = {n: torch.zeros(B, N, **new) for n in needs.column_norm}
        self.power = {n: torch.zeros(B, N, **new) for n in needs.column_norm if not math.isinf(n)}
        self.registered = {s: _registered(s).start(B, H, N, **new) for s in needs.statistics}

    def from_logits(self, s: Tensor, images: slice, rows: slice) -> None:
        """Orders that ``safe_from_probs`` refuses, by log-sum-exp from the chunk's logits (b, H, c, N)."""
        for a in self.unsafe_orders():
            self.entropy[a][images, :, rows] = renyi_entropy(s, a)

    def unsafe_orders(self) -> list[float]:
        return [a for a in self.needs.row_entropy if not safe_from_probs(a, self.num_keys)]

    def chunk_buffers(self) -> float:
        """Chunk-sized buffers a chunk of queries takes while folded in, for the cost model: 3 with an
        order computed by log-sum-exp (``from_logits``), 1 + ``SHANNON_TEMP_SHARE`` with the Shannon
        entropy (the chunk and its temporary, at most that share of it), else 1."""
        if self.unsafe_orders():
            return 3.0
        return 1.0 + SHANNON_TEMP_SHARE if 1.0 in self.needs.row_entropy else 1.0

    def add(self, chunk: Chunk) -> None:
        """Fold one chunk's probabilities in."""
        p, bs, rs = chunk.probs, chunk.images, chunk.rows
        acc = accumulation_dtype(p)
        for a in self.needs.row_entropy:
            if safe_from_probs(a, self.num_keys):
                self.entropy[a][bs, :, rs] = entropy_from_probs(p, a)
        if self.received is not None:
            self.received[bs] += p.sum(dim=2, dtype=acc)
        if self.cls is not None and rs.start == 0:
            self.cls[bs] = p[:, :, 0]
        if self.mean_attention is not None or self.peak:
            p_mean = p.mean(dim=1, dtype=acc)  # (b, c, N)
            if self.mean_attention is not None:
                self.mean_attention[bs, rs] = p_mean
            self._add_columns(bs, p_mean)
        for name, state in self.registered.items():
            self.registered[name] = STATISTICS[name].fold(state, chunk)

    def _add_columns(self, bs: slice, p_mean: Tensor) -> None:
        """Online l_n sums: with m the running column maximum, sum (p/m)^n is rescaled by (m_old/m_new)^n."""
        tiny = torch.finfo(p_mean.dtype).tiny
        for n, peak in self.peak.items():
            new_peak = torch.maximum(peak[bs], p_mean.amax(dim=1))
            if not math.isinf(n):
                floor = new_peak.clamp_min(tiny)
                rescale = (peak[bs] / floor).pow_(n)  # earlier chunks' terms, relative to the new peak
                terms = (p_mean / floor.unsqueeze(1)).pow_(n).sum(1)
                self.power[n][bs] = self.power[n][bs] * rescale + terms
            peak[bs] = new_peak

    def result(self) -> dict[str, object]:
        """{Needs field: value}: per-order (B, H, N) entropies and per-n (B, N) column norms as dicts."""
        norms = {}
        for n, peak in self.peak.items():
            tiny = torch.finfo(peak.dtype).tiny
            norms[n] = peak if math.isinf(n) else peak.clamp_min(tiny) * self.power[n].pow(1.0 / n)
        received = None if self.received is None else self.received / self.num_keys
        registered = {name: STATISTICS[name].result(state) for name, state in self.registered.items()}
        return dict(row_entropy=self.entropy, cls_row=self.cls, received=received, column_norm=norms,
                    mean_attention=self.mean_attention, statistics=registered)  # fmt: skip


class AttentionContext:
    """What a criterion may read at a pruning block.

    ``logits``: (B, H, N, N) attention logits q.k/sqrt(d) before softmax, queries x keys; tokens
    0..P-1 are the ``num_prefix`` prefix tokens (token 0 is CLS, then e.g. a distillation token), never
    candidates; tokens P..P+n-1 are the candidate patches, a fused token (if any) comes last.

    A pruning block also passes the ``Operands`` the logits came from and lets the context turn the
    logits buffer into the probabilities in place (``reuse_logits``), so that the block holds one
    (B, H, N, N) tensor at a time; reading ``logits`` after that recomputes them (same values).
    Statistics come from ``Statistics`` over the whole tensor, computed once each.
    """

    def __init__(
        self,
        logits: Tensor | None,
        num_patches: int,
        stage: int = 0,
        step: int | Tensor = 0,
        *,
        operands: Operands | None = None,
        reuse_logits: bool = False,
        num_prefix: int = 1,
    ):
        self._logits = logits
        self.num_patches = num_patches
        self.num_prefix = num_prefix  # prefix tokens (CLS, distillation, ...) before the patches
        self.stage = stage
        self.step = step
        self._ops = operands or Operands()
        has_qk = self._ops.query is not None and self._ops.key is not None
        # In-place softmax needs a way to get the logits back, and no autograd graph through them.
        self._reuse = reuse_logits and has_qk and logits is not None and not logits.requires_grad
        self._probs: Tensor | None = None
        self._stats: dict[tuple, object] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_patches={self.num_patches}, stage={self.stage})"

    @property
    def logits(self) -> Tensor:
        """The attention logits (B, H, N, N); once a criterion has read them they are never overwritten."""
        if self._logits is None:  # became the probabilities in place: recompute
            self._logits = self._ops.logits()
        self._reuse = False
        return self._logits

    @property
    def probs(self) -> Tensor:
        """softmax(logits) over keys (B, H, N, N), computed once and shared with the attention output."""
        if self._probs is None:
            s = self._logits if self._logits is not None else self.logits
            if not self._reuse:
                self._probs = s.softmax(dim=-1)
            else:  # in place: one N x N buffer
                self._probs, self._logits = softmax_in_place(s), None
        return self._probs

    @property
    def batch_size(self) -> int:
        return self._any_attention().shape[0]

    @property
    def device(self) -> torch.device:
        return self._any_attention().device

    def _any_attention(self) -> Tensor:
        return self._logits if self._logits is not None else self._probs

    def _statistic(self, field: str, order: float | None = None):
        """One statistic of ``Statistics`` (one order of it), from the whole probability tensor, cached."""
        if (field, order) not in self._stats:
            value = order if order is not None else True
            stats = Statistics(Needs(**{field: (value,) if order is not None else value}),
                               tuple(self.probs.shape[:3]), self.probs)  # fmt: skip
            ops = self._ops
            stats.add(Chunk(self.probs, slice(None), slice(0, None), ops.query, ops.key, ops.scale, ops.bias))
            got = stats.result()[field]
            self._stats[(field, order)] = got[order] if order is not None else got
        return self._stats[(field, order)]

    @property
    def cls_rows(self) -> Tensor:
        """Each head's CLS query (token 0) attention to every token, prefix included (B, H, N); float32
        for float16/bfloat16 attention, its own dtype otherwise."""
        if self._probs is None and ("cls_row", None) not in self._stats:  # one row, no full softmax
            row = self._logits[:, :, 0].softmax(dim=-1)
            self._stats[("cls_row", None)] = row.to(accumulation_dtype(row))
        return self._statistic("cls_row")

    @property
    def received(self) -> Tensor:
        """Attention each token receives per head, mean over the queries (B, H, N), prefix included."""
        return self._statistic("received")

    @property
    def mean_attention(self) -> Tensor:
        """The head-mean attention (B, N queries, N keys)."""
        return self._statistic("mean_attention")

    def column_norm(self, n: float) -> Tensor:
        """l_n norm of every key's column (over queries) of the head-mean attention (B, N), prefix included;
        scaled by the column maximum so that p^n cannot underflow to 0 for small attention."""
        return self._statistic("column_norm", float(n))

    def statistic(self, name: str):
        """The registered statistic ``name`` (``register_statistic``) of this block's attention."""
        return self._statistic("statistics", name)

    @property
    def cls_attn(self) -> Tensor:
        """Mean over heads of the CLS query's attention to every token, prefix included (B, N)."""
        return self.cls_rows.mean(dim=1)

    @property
    def key(self) -> Tensor:
        """The block's keys (B, H, N, d), for criteria that compare tokens by what they match on."""
        if self._ops.key is None:
            raise ValueError("this criterion needs the attention keys; pass operands=Operands(key=...)")
        return self._ops.key

    @property
    def value(self) -> Tensor:
        """The block's values (B, H, N, d), for criteria that weigh attention by what it carries."""
        if self._ops.value is None:
            raise ValueError("this criterion needs the attention values; pass operands=Operands(value=...)")
        return self._ops.value

    def patches(self, t: Tensor, dim: int = -1) -> Tensor:
        """Slice the candidate patch tokens P..P+n-1 out of ``t`` along ``dim`` (P = ``num_prefix``)."""
        return t.narrow(dim, self.num_prefix, self.num_patches)

    def row_entropy(self, alpha: float) -> Tensor:
        """Per-head Rényi entropy H_alpha of each candidate patch's attention row (B, H, n), cached.

        From the probabilities the output uses (``Statistics``) when the context has the block's operands
        and ``safe_from_probs`` allows the order; otherwise from the logits by log-sum-exp.
        """
        a = check_alpha(alpha)
        if ("row_entropy", a) not in self._stats:
            keys = self._any_attention().shape[-1]
            if self._ops.query is not None and self._ops.key is not None and safe_from_probs(a, keys):
                self._statistic("row_entropy", a)
            else:
                s = self._logits if self._logits is not None else self.logits
                self._stats[("row_entropy", a)] = renyi_entropy(s, a, dim=-1)
        return self.patches(self._stats[("row_entropy", a)], dim=2)


def softmax_in_place(s: Tensor) -> Tensor:
    """softmax over the last dim, written over ``s``; float16/bfloat16 in steps, the sums in float32."""
    if s.dtype in (torch.float32, torch.float64):
        return torch.softmax(s, dim=-1, out=s)
    s.sub_(s.amax(dim=-1, keepdim=True)).exp_()
    return s.div_(s.sum(dim=-1, keepdim=True, dtype=torch.float32))


def attention_logits(query: Tensor, key: Tensor, scale: float) -> Tensor:
    """(query @ key^T) * scale, the scale applied in place: the one formula blocks and contexts share."""
    return torch.matmul(query, key.transpose(-2, -1)).mul_(scale)


def ranking_qkv(
    attn: nn.Module, x: Tensor, float32_projection: bool = False
) -> tuple[tuple[Tensor, ...], contextlib.AbstractContextManager]:
    """The block's (q, k, v) and the context its ranking attention runs in.

    q, k, v are projected as every other block projects them (in the autocast dtype under autocast).
    Rankings are sensitive to rounding (bfloat16 logits of magnitude ~10 are rounded to 1/16), so with
    float16/bfloat16 q, k, v the ranking attention runs with autocast off and upcasts q and k to float32
    for its logits. ``float32_projection`` (autocast over float32 weights only): project q, k, v in
    float32 as well, so that they carry no half-precision rounding (~0.4 % of each logit) into the
    ranking; this runs the pruning blocks' projection and attention in float32 (docs/precision.md).
    """
    full = torch.autocast(x.device.type, enabled=False)
    if float32_projection and x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        with full:
            return attn.qkv_heads(x), full
    q, k, v = attn.qkv_heads(x)
    if q.dtype not in (torch.float16, torch.bfloat16):
        return (q, k, v), contextlib.nullcontext()
    return (q, k, v), full


def explicit_qkv(
    attn: nn.Module, x: Tensor, float32_projection: bool = False
) -> tuple[tuple, tuple, contextlib.AbstractContextManager]:
    """(q, k, v), the float32 (q, k, v) the explicit attention runs on, and the context to run it in."""
    (q, k, v), precision = ranking_qkv(attn, x, float32_projection)
    if q.dtype not in (torch.float16, torch.bfloat16):
        return (q, k, v), (q, k, v), precision
    return (q, k, v), (q.float(), k.float(), v.float()), precision


