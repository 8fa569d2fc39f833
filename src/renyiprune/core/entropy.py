"""Rényi entropy of softmax distributions, computed from logits.

Pure tensor math: nothing here knows about models. Every form works on logits s
(p = softmax(s)) through log-sum-exp, so no probability tensor has to be raised to a
power and exponent underflow cannot turn a small entropy into log(0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["renyi_entropy", "check_alpha", "parse_alpha"]

# Within this distance of alpha = 1 the general form (L(a*s) - a*L(s)) / (1 - a) is a 0/0 that
# loses precision in float32, so the expm1 form below is used instead (see _renyi_near_one).
_NEAR_ONE = 0.5


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
