"""Token-importance criteria: each maps one block's attention to a score per patch token.

A criterion is a plain function ``fn(ctx, **options) -> Tensor (B, n)``, higher = keep, registered
by name with ``@register_criterion(name, needs=...)``. Adding one is one function plus its decorator
line. ``needs`` (``attention.Needs``, or a function of the criterion's options returning one) declares
what the criterion reads from the context (row entropies, the CLS row, column statistics, keys, values,
or the full attention), so that the pruning block computes only that and never more
(``streamed.attend``); a criterion without a declaration gets the full explicit attention.
A criterion checks its option values before it reads the context: ``make_criterion`` runs exactly that
part, on a context that stops the criterion at its first read, so bad options fail with no forward pass.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import torch
from torch import Tensor

from .attention import FULL, AttentionContext, Needs, attention_logits
from .entropy import check_alpha, renyi_entropy

__all__ = [
    "AttentionContext",  # defined in attention.py, re-exported: criteria are written against it
    "Needs",
    "attention_logits",
    "needs_of",
    "Criterion",
    "CRITERIA",
    "register_criterion",
    "make_criterion",
    "list_criteria",
]

Criterion = Callable[[AttentionContext], Tensor]


CRITERIA: dict[str, Callable[..., Tensor]] = {}
NeedsSpec = Needs | Callable[[dict], Needs]


def register_criterion(
    name: str, needs: NeedsSpec = FULL
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator: make ``fn(ctx, **options)`` available as criterion ``name``.

    ``needs``: what it reads from the context, a ``Needs`` or a function of its options (a dict with
    every option, defaults filled in) returning one. The default is the full explicit attention.
    """

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        fn.needs = needs
        CRITERIA[name] = fn
        return fn

    return deco


def needs_of(criterion: str | Callable[..., Tensor], **options) -> Needs:
    """What a registered criterion (by name, with these options) or a bound criterion reads."""
    fn = CRITERIA[criterion] if isinstance(criterion, str) else criterion
    base = getattr(fn, "func", fn)  # a functools.partial carries its options bound
    spec = getattr(fn, "needs", None) or getattr(base, "needs", FULL)
    if callable(spec):
        return spec({**criterion_options(base), **getattr(fn, "keywords", {}), **options})
    return spec


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
    """Bind options to a registered criterion (or a callable), checking them now, with no forward pass.

    Unknown option names fail by the signature; invalid values fail by the criterion's own checks, which
    run on a context that stops it at its first read (``_OptionsChecked``). The returned callable carries
    its resolved ``needs``; reading something undeclared fails at the first forward, naming the field.
    """
    if callable(criterion):
        fn = functools.partial(criterion, **options)
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
    try:
        inspect.signature(fn.func).bind(None, **fn.keywords)
    except TypeError as e:
        raise ValueError(f"criterion {criterion!r}: {e}") from None
    fn.needs = needs_of(fn)
    try:
        fn(_OPTION_PROBE)
    except _OptionsChecked:
        pass
    return fn


class _OptionsChecked(Exception):
    """Raised by ``_OptionProbe`` at a criterion's first read of its context: its option checks passed."""


class _OptionProbe:
    """A stand-in context that stops a criterion at its first read, after its option checks ran."""

    def __getattr__(self, name: str):
        raise _OptionsChecked(name)


_OPTION_PROBE = _OptionProbe()


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _mean_heads_log_probs(log_p: Tensor) -> Tensor:
    """log of the head-mean distribution: log((1/H) sum_h p_h) from per-head log-probabilities."""
    return torch.logsumexp(log_p, dim=1) - math.log(log_p.shape[1])


# ---------------------------------------------------------------------------------------------
# Criteria


def _renyi_needs(o: dict) -> Needs:
    """Row entropies for the default options (per-head rows, CLS key included); the rest reads the logits."""
    if (o["direction"], o["heads"], o["cls_key"]) == ("row", "mean", "include"):
        return Needs(row_entropy=(o.get("alpha", 1.0),))
    return FULL


@register_criterion("renyi", needs=_renyi_needs)
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


@register_criterion("shannon", needs=_renyi_needs)
def shannon(ctx: AttentionContext, direction: str = "row", heads: str = "mean", cls_key: str = "include"):
    """Rényi with alpha = 1: -Shannon entropy of each patch's attention."""
    return renyi(ctx, alpha=1.0, direction=direction, heads=heads, cls_key=cls_key)


@register_criterion("renyi_paper", needs=FULL)
def renyi_paper(ctx: AttentionContext, alpha: float = 1.0, heads: str = "mean") -> Tensor:
    """The paper's Definition 1 read literally: each patch's attention over the patch keys only (the CLS
    key left out, the row renormalized), Rényi entropy per head, averaged (``renyi`` with
    ``cls_key="exclude"``; docs/method.md)."""
    return renyi(ctx, alpha=alpha, direction="row", heads=heads, cls_key="exclude")


@register_criterion("evit", needs=Needs(cls_row=True))
def evit(ctx: AttentionContext) -> Tensor:
    """EViT: the CLS query's attention to each patch, averaged over heads."""
    return ctx.patches(ctx.cls_attn)


@register_criterion("random", needs=Needs())
def random(ctx: AttentionContext, seed: int = 0) -> Tensor:
    """Uniform random scores, independent per image and stage, reproducible for a seed."""
    return _uniform_scores(ctx.batch_size, ctx.num_patches, int(seed), ctx.step, ctx.stage, ctx.device)


@torch.compiler.disable  # eager: compiled, the per-forward seed would recompile the model at every forward
def _uniform_scores(
    batch: int, n: int, seed: int, step: int | Tensor, stage: int, device: torch.device
) -> Tensor:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + int(step) * 1009 + stage) % (2**63))
    return torch.rand(batch, n, generator=g, device=device)


# ---------------------------------------------------------------------------------------------
# More criteria (sweeps): head disagreement, column norms, a Rényi/CLS hybrid


def _received(ctx: AttentionContext) -> Tensor:
    """Attention each candidate patch receives per head, averaged over queries: (B, H, n)."""
    return ctx.patches(ctx.received, dim=-1)


@register_criterion("headvar", needs=Needs(received=True))
def headvar(ctx: AttentionContext, robust: bool = False) -> Tensor:
    """Disagreement of heads about a patch (arXiv 2507.19175): variance over heads of the attention it
    receives; ``robust`` uses the median absolute deviation from the head median instead."""
    a = _received(ctx)
    if not robust:
        return a.var(dim=1, unbiased=False)
    med = a.median(dim=1, keepdim=True).values
    return (a - med).abs().median(dim=1).values


@register_criterion("column_norm", needs=lambda o: Needs(column_norm=(float(o["norm"]),)))
def column_norm(ctx: AttentionContext, norm: float = 4.0) -> Tensor:
    """l_n norm of each patch key's column of the head-mean attention (Su et al., arXiv 2603.27900);
    ranking by it matches ranking by the column Rényi entropy of order n."""
    n = float(norm)
    if not n >= 1.0:
        raise ValueError(f"norm must be >= 1, got {norm!r}")
    return ctx.patches(ctx.column_norm(n))  # over the queries of the head-mean attention


def standardize(s: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-image z-score over the tokens of ``s`` (B, n), in float32; ``eps`` floors the deviation."""
    s = s.float()
    return (s - s.mean(dim=1, keepdim=True)) / s.std(dim=1, keepdim=True, correction=0).clamp_min(eps)


def _ranks(s: Tensor) -> Tensor:
    """Per-image rank of each patch in [0, 1] (0 = lowest score)."""
    r = s.argsort(dim=1).argsort(dim=1).float()
    return r / max(s.shape[1] - 1, 1)


def _hybrid_needs(o: dict) -> Needs:
    base = needs_of("renyi", **{k: o[k] for k in ("alpha", "direction", "heads", "cls_key")})
    if o["base"] != "renyi":
        base = needs_of(o["base"]) if o["base"] in CRITERIA else FULL
    return base | Needs(cls_row=True)


@register_criterion("hybrid", needs=_hybrid_needs)
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


@register_criterion("cls_value", needs=Needs(cls_row=True, value=True))
def cls_value(ctx: AttentionContext) -> Tensor:
    """How far each patch moves the CLS token: mean over heads of a_h(CLS -> j) * ||v_h,j||.

    The CLS update is sum_j a_j v_j, so a patch with small attention but a large value can matter more
    than EViT's attention alone says (the norm-based view of attention, Kobayashi et al. 2020).
    """
    norms = ctx.value.float().norm(dim=-1)  # (B, H, N)
    return ctx.patches((ctx.cls_rows * norms).mean(dim=1))


@register_criterion("pagerank", needs=Needs(mean_attention=True))
def pagerank(ctx: AttentionContext, iterations: int = 3) -> Tensor:
    """Attention received, weighted by the importance of who attends: s <- A^T s from uniform s.

    A is the head-mean attention (row-stochastic); one iteration is the mean attention each patch
    receives, more iterations approach A's stationary distribution (a PageRank without damping, the
    idea behind Zero-TPrune's weighted PageRank).
    """
    it = int(iterations)
    if it < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations!r}")
    a = ctx.mean_attention  # (B, N queries, N keys)
    s = torch.full(a.shape[:2], 1.0 / a.shape[1], dtype=a.dtype, device=a.device)
    for _ in range(it):
        s = torch.bmm(s.unsqueeze(1), a).squeeze(1)  # s_j <- sum_i s_i A_ij
    return ctx.patches(s)


@register_criterion("evit_renyi", needs=Needs(cls_row=True))
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


@register_criterion(
    "diverse", needs=lambda o: (needs_of(o["base"]) if o["base"] in CRITERIA else FULL) | Needs(key=True)
)
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
