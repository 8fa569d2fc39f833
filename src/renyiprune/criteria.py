"""Token-importance criteria: each maps one block's attention to a score per patch token.

A criterion is a plain function ``fn(ctx, **options) -> Tensor (B, n)``, higher = keep, registered
by name with ``@register_criterion``. Adding one is one function plus its decorator line. The
context gives the attention logits of the pruning block and cached derived views (probabilities,
CLS attention), so a criterion computes only what it needs.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import torch
from torch import Tensor

from .entropy import check_alpha, renyi_entropy

__all__ = [
    "AttentionContext",
    "Criterion",
    "CRITERIA",
    "register_criterion",
    "make_criterion",
    "list_criteria",
]

Criterion = Callable[["AttentionContext"], Tensor]


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
    def cls_rows(self) -> Tensor:
        """Each head's CLS query (token 0) attention to every token, prefix included (B, H, N), float32."""
        if self._cls_rows is None:
            s = self._logits if self._logits is not None else None
            row = self._probs[:, :, 0] if self._probs is not None else s[:, :, 0].softmax(-1)
            self._cls_rows = row.float()
        return self._cls_rows

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


CRITERIA: dict[str, Callable[..., Tensor]] = {}


def register_criterion(name: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator: make ``fn(ctx, **options)`` available as criterion ``name``."""

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        CRITERIA[name] = fn
        return fn

    return deco


def list_criteria() -> list[str]:
    return sorted(CRITERIA)


def criterion_options(fn: Callable[..., Tensor]) -> dict[str, object]:
    """The keyword options a criterion accepts, with their defaults."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    return {p.name: p.default for p in params}


def takes_alpha(criterion: str | None, options: dict | None = None) -> bool:
    """Whether a registered criterion's ranking depends on a Rényi order (hybrid: only over renyi)."""
    if criterion not in CRITERIA or "alpha" not in criterion_options(CRITERIA[criterion]):
        return False
    return criterion != "hybrid" or (options or {}).get("base", "renyi") == "renyi"


def make_criterion(criterion: str | Criterion, **options) -> Criterion:
    """Bind options to a registered criterion (or a callable), checking them on a tiny input now.

    Unknown option names and invalid values fail here, not at the first forward.
    """
    if callable(criterion):
        fn = functools.partial(criterion, **options) if options else criterion
    else:
        if criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; known: {', '.join(list_criteria())}")
        base = CRITERIA[criterion]
        known = criterion_options(base)
        bad = sorted(set(options) - set(known))
        if bad:
            raise ValueError(
                f"criterion {criterion!r} has no option {', '.join(bad)}; "
                f"its options: {', '.join(known) or 'none'}"
            )
        fn = functools.partial(base, **options)
    q, k, v = torch.randn(3, 1, 2, 4, 3).unbind(0)
    probe = AttentionContext(attention_logits(q, k, 0.5), num_patches=3, query=q, key=k, value=v, scale=0.5)
    out = fn(probe)
    if out.shape != (1, 3):
        raise ValueError(f"criterion returned shape {tuple(out.shape)} for 3 patches; expected (1, 3)")
    return fn


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _mean_heads_log_probs(log_p: Tensor) -> Tensor:
    """log of the head-mean distribution: log((1/H) sum_h p_h) from per-head log-probabilities."""
    return torch.logsumexp(log_p, dim=1) - math.log(log_p.shape[1])


# ---------------------------------------------------------------------------------------------
# Criteria


@register_criterion("renyi")
def renyi(
    ctx: AttentionContext,
    alpha: float = 1.0,
    direction: str = "row",
    heads: str = "mean",
    cls_key: str = "include",
) -> Tensor:
    """-H_alpha of each patch's attention: its query's row (default) or the normalized column it receives.

    heads='mean' averages per-head entropies; 'pooled' takes the entropy of the head-mean
    distribution. cls_key='exclude' drops the CLS key (token 0 only; other prefix tokens stay) from
    every row and renormalizes.
    """
    alpha = check_alpha(alpha)
    _choice("direction", direction, ("row", "column"))
    _choice("heads", heads, ("mean", "pooled"))
    _choice("cls_key", cls_key, ("include", "exclude"))
    if direction == "row" and heads == "mean" and cls_key == "include":
        return -ctx.row_entropy(alpha).mean(dim=1)  # shares the block's probabilities (fast path)
    s = ctx.logits.float() if ctx.logits.dtype in (torch.float16, torch.bfloat16) else ctx.logits
    first_key = 1 if cls_key == "exclude" else 0
    keys = s[..., first_key:]  # softmax over a subset of keys = renormalized row
    if direction == "row":
        rows = ctx.patches(keys, dim=2)  # (B, H, n, K)
        if heads == "mean":
            h = renyi_entropy(rows, alpha, dim=-1).mean(dim=1)
        else:
            h = renyi_entropy(_mean_heads_log_probs(rows.log_softmax(-1)), alpha, dim=-1)
        return -h
    # Column: the attention key j receives from every query, p_ij / sum_i p_ij. Its entropy is the
    # entropy of softmax over queries of log p_ij, so renyi_entropy applies along the query axis.
    log_p = keys.log_softmax(dim=-1)
    if heads == "pooled":
        log_p = _mean_heads_log_probs(log_p).unsqueeze(1)
    cols = log_p.narrow(-1, ctx.num_prefix - first_key, ctx.num_patches)  # candidate keys
    return -renyi_entropy(cols, alpha, dim=-2).mean(dim=1)


@register_criterion("shannon")
def shannon(ctx: AttentionContext, direction: str = "row", heads: str = "mean", cls_key: str = "include"):
    """Rényi with alpha = 1: -Shannon entropy of each patch's attention."""
    return renyi(ctx, alpha=1.0, direction=direction, heads=heads, cls_key=cls_key)


@register_criterion("evit")
def evit(ctx: AttentionContext) -> Tensor:
    """EViT: the CLS query's attention to each patch, averaged over heads."""
    return ctx.patches(ctx.cls_attn)


@register_criterion("random")
def random(ctx: AttentionContext, seed: int = 0) -> Tensor:
    """Uniform random scores, independent per image and stage, reproducible for a seed."""
    device = ctx.logits.device
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + ctx.step * 1009 + ctx.stage) % (2**63))
    return torch.rand(ctx.logits.shape[0], ctx.num_patches, generator=g, device=device)


# ---------------------------------------------------------------------------------------------
# More criteria (sweeps): head disagreement, column norms, a Rényi/CLS hybrid


def _received(ctx: AttentionContext) -> Tensor:
    """Attention each candidate patch receives per head, averaged over queries: (B, H, n), float32."""
    return ctx.patches(ctx.probs.float().mean(dim=2), dim=-1)


@register_criterion("headvar")
def headvar(ctx: AttentionContext, robust: bool = False) -> Tensor:
    """Disagreement of heads about a patch (arXiv 2507.19175): variance over heads of the attention it
    receives; ``robust`` uses the median absolute deviation from the head median instead."""
    a = _received(ctx)
    if not robust:
        return a.var(dim=1, unbiased=False)
    med = a.median(dim=1, keepdim=True).values
    return (a - med).abs().median(dim=1).values


@register_criterion("column_norm")
def column_norm(ctx: AttentionContext, norm: float = 4.0) -> Tensor:
    """l_n norm of each patch key's column of the head-mean attention (Su et al., arXiv 2603.27900);
    ranking by it matches ranking by the column Rényi entropy of order n."""
    n = float(norm)
    if not n >= 1.0:
        raise ValueError(f"norm must be >= 1, got {norm!r}")
    cols = ctx.patches(ctx.probs.float().mean(dim=1), dim=-1)  # (B, N queries, n keys)
    if math.isinf(n):
        return cols.amax(dim=1)
    # Scale by the column maximum so that p^n cannot underflow to 0 for small attention.
    peak = cols.amax(dim=1, keepdim=True).clamp_min(torch.finfo(cols.dtype).tiny)
    return peak.squeeze(1) * (cols / peak).pow(n).sum(dim=1).pow(1.0 / n)


def standardize(s: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-image z-score over the tokens of ``s`` (B, n), in float32; ``eps`` floors the deviation."""
    s = s.float()
    return (s - s.mean(dim=1, keepdim=True)) / s.std(dim=1, keepdim=True, correction=0).clamp_min(eps)


def _ranks(s: Tensor) -> Tensor:
    """Per-image rank of each patch in [0, 1] (0 = lowest score)."""
    r = s.argsort(dim=1).argsort(dim=1).float()
    return r / max(s.shape[1] - 1, 1)


@register_criterion("hybrid")
def hybrid(
    ctx: AttentionContext,
    alpha: float = 1.0,
    lam: float = 0.5,
    combine: str = "z",
    direction: str = "row",
    heads: str = "mean",
    cls_key: str = "include",
    base: str = "renyi",
) -> Tensor:
    """(1 - lam) * Rényi score + lam * EViT's CLS attention, each standardized per image (``combine='z'``)
    or turned into ranks (``'rank'``); lam = 0 ranks as renyi, lam = 1 as evit. ``base`` names another
    registered criterion (e.g. 'headvar', 'column_norm') to blend with the CLS attention instead."""
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam!r}")
    _choice("combine", combine, ("z", "rank"))
    _choice("base", base, tuple(c for c in list_criteria() if c not in ("hybrid", "evit")))
    if base == "renyi":
        ent = renyi(ctx, alpha=alpha, direction=direction, heads=heads, cls_key=cls_key)
    else:
        ent = CRITERIA[base](ctx)
    cls = evit(ctx)
    f = standardize if combine == "z" else _ranks
    return (1.0 - lam) * f(ent) + lam * f(cls)


# ---------------------------------------------------------------------------------------------
# CLS-attention refinements: what the attention carries, where it flows, which heads are focused


@register_criterion("cls_value")
def cls_value(ctx: AttentionContext) -> Tensor:
    """How far each patch moves the CLS token: mean over heads of a_h(CLS -> j) * ||v_h,j||.

    The CLS update is sum_j a_j v_j, so a patch with small attention but a large value can matter more
    than EViT's attention alone says (the norm-based view of attention, Kobayashi et al. 2020).
    """
    norms = ctx.value.float().norm(dim=-1)  # (B, H, N)
    return ctx.patches((ctx.cls_rows * norms).mean(dim=1))


@register_criterion("pagerank")
def pagerank(ctx: AttentionContext, iterations: int = 3) -> Tensor:
    """Attention received, weighted by the importance of who attends: s <- A^T s from uniform s.

    A is the head-mean attention (row-stochastic); one iteration is the mean attention each patch
    receives, more iterations approach A's stationary distribution (a PageRank without damping, the
    idea behind Zero-TPrune's weighted PageRank).
    """
    it = int(iterations)
    if it < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations!r}")
    a = ctx.probs.float().mean(dim=1)  # (B, N queries, N keys)
    s = torch.full(a.shape[:2], 1.0 / a.shape[1], dtype=a.dtype, device=a.device)
    for _ in range(it):
        s = torch.bmm(s.unsqueeze(1), a).squeeze(1)  # s_j <- sum_i s_i A_ij
    return ctx.patches(s)


@register_criterion("evit_renyi")
def evit_renyi(ctx: AttentionContext, alpha: float = 2.0, sharpness: float = 1.0) -> Tensor:
    """EViT's CLS attention with heads weighted by focus: w_h ∝ exp(-sharpness * H_alpha(CLS row of h)).

    exp(H_alpha) is the effective number of keys a head's CLS query looks at; heads that look at few
    keys vote more. sharpness = 0 is EViT.
    """
    a = check_alpha(alpha)
    g = float(sharpness)
    if not g >= 0.0:
        raise ValueError(f"sharpness must be >= 0, got {sharpness!r}")
    rows = ctx.cls_rows  # (B, H, N)
    h = renyi_entropy(rows.log(), a, dim=-1)  # log p as logits: softmax(log p) = p; zeros leave the support
    w = torch.softmax(-g * h, dim=1)  # (B, H), sums to 1 over heads
    return ctx.patches((w.unsqueeze(-1) * rows).sum(dim=1))


# ---------------------------------------------------------------------------------------------
# Redundancy: a patch whose information a more important patch already carries can go


@register_criterion("diverse")
def diverse(ctx: AttentionContext, beta: float = 2.0, base: str = "evit") -> Tensor:
    """A ``base`` criterion's score minus ``beta`` x redundancy, both standardized per image.

    Redundancy of patch j = max cosine similarity of its key to the key of any patch that the base
    ranks above j (head-mean keys, the similarity ToMe matches on): the twin and the fused token
    carry what j would add, so pruning it loses little. beta = 0 ranks as the base.
    """
    b = float(beta)
    if not b >= 0.0:
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    _choice("base", base, tuple(c for c in list_criteria() if c not in ("diverse", "hybrid")))
    score = CRITERIA[base](ctx).float()  # (B, n)
    k = torch.nn.functional.normalize(ctx.patches(ctx.key.float().mean(dim=1), dim=1), dim=-1)
    sim = k @ k.transpose(1, 2)  # (B, n, n) cosine similarity of patch keys
    not_above = score.unsqueeze(1) <= score.unsqueeze(2)  # [b, j, i]: the base does not rank i above j
    redundancy = sim.masked_fill_(not_above, -1.0).amax(dim=2)  # -1 for the top patch: nothing above it
    return standardize(score) - b * standardize(redundancy)
