"""Paired comparison of two classifiers on the same images: how large a top-1 difference is, and
whether it is more than the luck of which images disagree.

Pure Python on per-image outcomes ('0'/'1' strings, as sweep records store them); nothing here
knows about models.
"""

from __future__ import annotations

import math

__all__ = ["paired_difference", "paired_counts", "compare_records", "format_difference", "select_outcomes",
           "top1_of_outcomes", "paired_summary"]

Z95 = 1.959963984540054  # standard normal 97.5 % quantile


def _binom_tail(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), summed exactly in log space."""
    if k < 0:
        return 0.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2.0)
            for i in range(min(k, n) + 1)]  # fmt: skip
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def paired_difference(a: str, b: str) -> dict:
    """Top-1 of A minus top-1 of B (points) on the same images, with its 95 % interval and McNemar's p.

    ``a``, ``b``: per-image outcomes ('1' = right) in the same image order. See ``paired_counts``.
    """
    if len(a) != len(b):
        raise ValueError(f"outcomes of {len(a)} and {len(b)} images: not the same images")
    if set(a) - {"0", "1"} or set(b) - {"0", "1"}:
        raise ValueError("outcomes must be strings of '0' and '1'")
    a_only = sum(1 for x, y in zip(a, b, strict=True) if x == "1" and y == "0")
    b_only = sum(1 for x, y in zip(a, b, strict=True) if x == "0" and y == "1")
    return paired_counts(a_only, b_only, len(a))


def paired_counts(a_only: int, b_only: int, images: int) -> dict:
    """Top-1 difference of A and B from the images where they disagree (points), 95 % interval, p.

    Only disagreements carry information: ``a_only`` images A gets right and B wrong, ``b_only`` the
    reverse, out of ``images``. The interval is the normal one for the mean of the per-image
    differences d_i in {-1, 0, 1}; p is the exact two-sided McNemar (sign) test of a_only vs b_only.
    """
    n = int(images)
    if n <= 0:
        raise ValueError("no images to compare")
    if a_only < 0 or b_only < 0 or a_only + b_only > n:
        raise ValueError(f"{a_only} + {b_only} disagreements do not fit {n} images")
    mean = (a_only - b_only) / n
    var = (a_only + b_only) / n - mean * mean  # population variance of d_i
    half = Z95 * math.sqrt(max(var, 0.0) / n)
    d = a_only + b_only
    p = 1.0 if d == 0 else min(1.0, 2.0 * _binom_tail(min(a_only, b_only), d))
    return {
        "images": n,
        "delta": 100.0 * mean,
        "ci95": (100.0 * (mean - half), 100.0 * (mean + half)),
        "a_only": int(a_only),
        "b_only": int(b_only),
        "p_mcnemar": p,
    }


def compare_records(a: dict, b: dict) -> dict | None:
    """``paired_difference`` of two sweep records (their per-image ``correct`` strings), JSON-ready;
    None where a record has no per-image outcomes (written before they were recorded)."""
    if "correct" not in a or "correct" not in b:
        return None
    d = paired_difference(a["correct"], b["correct"])
    return {**{k: v for k, v in d.items() if k != "images"}, "ci95": list(d["ci95"])}


def format_difference(d: dict | None) -> tuple[str, str]:
    """('+1.02 [-2.16, +4.21]', '0.61') for a table; ('-', '-') without outcomes."""
    if d is None:
        return "-", "-"
    lo, hi = d["ci95"]
    return f"{d['delta']:+.2f} [{lo:+.2f}, {hi:+.2f}]", f"{d['p_mcnemar']:.2f}"


def select_outcomes(outcomes: str, mask: list[bool]) -> str:
    """The per-image outcomes of the images ``mask`` selects (a calibration or evaluation half)."""
    return "".join(b for b, m in zip(outcomes, mask, strict=True) if m)


def top1_of_outcomes(outcomes: str) -> float:
    """Top-1 (percent) of per-image outcomes; 0 for no images."""
    return 100.0 * outcomes.count("1") / max(len(outcomes), 1)


def paired_summary(a: str, b: str) -> dict:
    """``paired_difference`` of two outcome strings as a JSON-ready {delta, ci95, p_mcnemar}."""
    d = paired_difference(a, b)
    return {"delta": d["delta"], "ci95": list(d["ci95"]), "p_mcnemar": d["p_mcnemar"]}
