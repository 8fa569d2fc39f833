"""Rényi entropy of softmax distributions: the one definition, from logits or from probabilities.

Pure tensor math: nothing here knows about models. ``renyi_entropy`` works on logits s (p = softmax(s))
through log-sum-exp, so exponent underflow cannot turn a small entropy into log(0). ``entropy_from_probs``
is the same quantity from probabilities a block already holds; ``safe_from_probs`` is the one rule for
which orders may be computed that way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "renyi_entropy", "entropy_from_probs", "safe_from_probs", "accumulation_dtype", "check_alpha",
    "parse_alpha", "SHANNON_TEMP_SHARE",
]  # fmt: skip

# Within this distance of alpha = 1 the general form (L(a*s) - a*L(s)) / (1 - a) is a 0/0 that
# loses precision in float32, so the expm1 form below is used instead (see _renyi_near_one).
_NEAR_ONE = 0.5


#: Largest a * log(N) for which p^a over N keys is computed from probabilities: the smallest term that
#: matters, (1/N)^a, is then >= e^-60, far above float32's smallest normal (~1e-38 = e^-87).
_MAX_POWER_LOG = 60.0


def accumulation_dtype(t: Tensor) -> torch.dtype:
    """float32 for float16/bfloat16 tensors, the tensor's own dtype otherwise: where sums are taken."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def safe_from_probs(alpha: float, num_keys: int) -> bool:
    """Whether H_alpha over ``num_keys`` keys may be computed from probabilities (``entropy_from_probs``):
    alpha = 1 and inf always; other orders where |alpha - 1| >= 0.5 (no 0/0 near 1) and p^alpha cannot
    underflow. Elsewhere (alpha = 0 included) the log-sum-exp form ``renyi_entropy`` is used."""
    a = float(alpha)
    if a == 1.0 or math.isinf(a):
        return True
    return a != 0.0 and abs(a - 1.0) >= _NEAR_ONE and a * math.log(max(num_keys, 2)) <= _MAX_POWER_LOG


def entropy_from_probs(p: Tensor, alpha: float) -> Tensor:
    """H_alpha of every row of probabilities p along the last dim, for an order ``safe_from_probs`` allows.

    H_inf = -log max_j p_j;  H_a = a / (1 - a) log ||p||_a (a != 1);  H_1 = -sum_j p_j log p_j, with
    p_j clamped to the smallest normal number inside the log so that p_j = 0 (a masked or underflowed
    key) adds 0, not 0 * -inf. Sums in ``accumulation_dtype``.
    """
    a = float(alpha)
    acc = accumulation_dtype(p)
    if math.isinf(a):
        return p.amax(dim=-1).to(acc).log_().neg_()
    if a != 1.0:
        return torch.linalg.vector_norm(p, ord=a, dim=-1, dtype=acc).log_().mul_(a / (1.0 - a))
    return _shannon(p, acc)


#: The Shannon entropy's one temporary holds at most this many bytes, and at most this share of p's rows
#: (rounded up to a whole row): a chunk of probabilities takes 1 + SHANNON_TEMP_SHARE of its size.
_SHANNON_TEMP_BYTES = 1 << 20
SHANNON_TEMP_SHARE = 1 / 8


def _shannon(p: Tensor, acc: torch.dtype) -> Tensor:
    """-sum_j p_j log max(p_j, tiny) over the last dim, a block of rows at a time: its one temporary is at
    most an eighth of p (and 1 MiB), so an attention matrix never has a second copy of its size."""
    tiny = torch.finfo(acc).tiny
    if torch.is_grad_enabled() and p.requires_grad:
        return -torch.linalg.vecdot(p.to(acc), p.to(acc).clamp_min(tiny).log())
    rows = p.reshape(-1, p.shape[-1])
    out = torch.empty(rows.shape[0], dtype=acc, device=p.device)
    per_row = rows.shape[1] * (torch.finfo(acc).bits // 8)
    step = max(1, min(math.ceil(rows.shape[0] * SHANNON_TEMP_SHARE), _SHANNON_TEMP_BYTES // per_row))
    for i in range(0, rows.shape[0], step):
        x = rows[i : i + step]
        torch.sum(x.to(acc).clamp_min(tiny).log_().mul_(x), dim=-1, out=out[i : i + step])
    return out.view(p.shape[:-1]).neg_()


def check_alpha(alpha: float) -> float:
    """Return alpha as a float, or raise ValueError for NaN or negative orders."""
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number >= 0 (or inf), got {alpha!r}") from None
    if math.isnan(a) or a < 0:
        raise ValueError(f"alpha must be >= 0 (or inf), got {alpha!r}")
    return a


#: The largest finite order ``parse_alpha`` accepts: above it a·logits overflows float32 (1e38 gave NaN
#: entropies) long before the entropy differs from the min-entropy (``inf``) at float32 precision.
MAX_FINITE_ALPHA = 1e6


def parse_alpha(text: str) -> float:
    """Parse a user-typed order: '2', '0.5', 'inf', 'infinity' or '∞'; finite orders above
    ``MAX_FINITE_ALPHA`` are refused (type inf)."""
    t = text.strip().lower()
    if t in {"inf", "infinity", "∞", "+inf"}:
        return math.inf
    a = check_alpha(t)
    if math.isfinite(a) and a > MAX_FINITE_ALPHA:
        raise ValueError(f"alpha {text.strip()} is above {MAX_FINITE_ALPHA:.0f}: type inf (the min-entropy, "
                         "which such an order equals to float32 precision)")
    return a


def renyi_entropy(logits: Tensor, alpha: float, dim: int = -1) -> Tensor:
    """Rényi entropy of order ``alpha`` of ``softmax(logits)`` along ``dim`` (in nats).

    H_a(p) = log(sum_i p_i^a) / (1 - a); a = 1 is Shannon, a = inf min-entropy, a = 0 the log of
    the support size. Keys masked with -inf are outside the support. float16/bfloat16 inputs are
    computed (and returned) in float32; a row whose logits are all -inf gives NaN.
    """
    a = check_alpha(alpha)
    s = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    lse = torch.logsumexp(s, dim=dim)
    if a == 0.0:
        # H_0 = log |{i : p_i > 0}|: every key that is not masked out.
        support = (s > -math.inf).sum(dim=dim).to(s.dtype)
        return torch.log(support)
    if math.isinf(a):
        # H_inf = -log max p = L(s) - max s.
        return lse - s.amax(dim=dim)
    if abs(a - 1.0) < _NEAR_ONE:
        return _renyi_near_one(s, lse, a, dim)
    # H_a = (L(a*s) - a*L(s)) / (1 - a)   (method notes, log-sum-exp form)
    return (torch.logsumexp(a * s, dim=dim) - a * lse) / (1.0 - a)


def _renyi_near_one(s: Tensor, lse: Tensor, a: float, dim: int) -> Tensor:
    """Rényi entropy for |a - 1| < 0.5, exact at a = 1 and continuous through it.

    With l = s - L(s) = log p and d = a - 1: sum p^a = sum p * exp(d*l), so
    H_a = -log1p(sum p * expm1(d*l)) / d, which has no cancellation as d -> 0; at d = 0 it is the
    Shannon entropy H_1 = L(s) - sum p*s.
    """
    log_p = s - lse.unsqueeze(dim)
    p = torch.exp(log_p)
    inside = p > 0  # masked (-inf) or underflowed keys contribute exactly 0
    if a == 1.0:
        return -torch.where(inside, p * log_p, torch.zeros_like(p)).sum(dim=dim)
    d = a - 1.0
    terms = torch.where(inside, p * torch.expm1(d * torch.where(inside, log_p, 0.0)), 0.0)
    return -torch.log1p(terms.sum(dim=dim)) / d
