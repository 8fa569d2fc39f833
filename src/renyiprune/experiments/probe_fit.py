"""The probe's head: a multinomial logistic regression on standardized features, fitted full-batch with
L-BFGS, its L2 strength chosen on a held-out fifth of the training images (split by file-name hash).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DEFAULT_L2_GRID", "LinearHead", "is_holdout", "fit_logistic", "fit_probe"]

#: Candidate L2 strengths (on standardized features, mean cross-entropy), strongest first.
DEFAULT_L2_GRID = (3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)


def is_holdout(path: str | Path) -> bool:
    """True for the fifth of the training images that choose the L2 strength (hash of the file name)."""
    return hashlib.sha256(b"renyiprune-probe-holdout/" + Path(path).name.encode()).digest()[0] % 5 == 0


@dataclass
class LinearHead:
    """A linear classifier on raw features: ``logits = x @ weight.T + bias``; ``l2`` it was fitted with."""

    weight: Tensor  # (K, C)
    bias: Tensor  # (K,)
    l2: float
    holdout: dict = field(default_factory=dict)  # l2 -> held-out top-1 (percent), when it was chosen

    def logits(self, x: Tensor) -> Tensor:
        return x.to(self.weight.dtype) @ self.weight.T + self.bias


def _objective(z: Tensor, y: Tensor, w: Tensor, b: Tensor, l2: float) -> Tensor:
    return F.cross_entropy(z @ w.T + b, y) + 0.5 * l2 * (w * w).sum()


def fit_logistic(
    z: Tensor,
    y: Tensor,
    num_classes: int,
    l2: float,
    *,
    init: tuple[Tensor, Tensor] | None = None,
    max_iter: int = 500,
    tol: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Minimize ``mean CE(z W^T + b, y) + l2/2 ||W||^2`` over W (K, C), b (K,) with full-batch L-BFGS.

    The objective is strictly convex for l2 > 0, so this is its unique minimum (to ``tol``: the
    largest gradient entry). ``init``: a warm start (W, b). Computes in ``z``'s dtype.
    """
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}")
    c = z.shape[1]
    w = (init[0].clone() if init else z.new_zeros(num_classes, c)).to(z.dtype).requires_grad_(True)
    b = (init[1].clone() if init else z.new_zeros(num_classes)).to(z.dtype).requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> Tensor:
        opt.zero_grad()
        loss = _objective(z, y, w, b, l2)
        loss.backward()
        return loss

    with torch.enable_grad(), torch.inference_mode(False):
        opt.step(closure)
    return w.detach(), b.detach()


def _standardize(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    mu = x.mean(dim=0)
    sd = x.std(dim=0).clamp_min(1e-6)
    return (x - mu) / sd, mu, sd


def _fold(w: Tensor, b: Tensor, mu: Tensor, sd: Tensor) -> tuple[Tensor, Tensor]:
    """Weights on standardized features -> the same classifier on raw features."""
    w_raw = w / sd
    return w_raw, b - w_raw @ mu


def _choose_l2(x: Tensor, y: Tensor, num_classes: int, holdout: Tensor | None, grid: list[float],
               max_iter: int) -> tuple[float, dict[float, float]]:  # fmt: skip
    """The grid's best L2 on ``holdout`` (top-1, ties: lower cross-entropy), fitted on the rest, and
    every L2's held-out top-1."""
    if holdout is None or not bool(holdout.any()) or bool(holdout.all()):
        raise ValueError("choosing l2 needs a non-empty held-out part and a non-empty fitting part")
    z, mu, sd = _standardize(x[~holdout])
    zh, yh = (x[holdout] - mu) / sd, y[holdout]
    scores: dict[float, float] = {}
    init, key, best = None, None, grid[0]
    for lam in grid:
        w, b = fit_logistic(z, y[~holdout], num_classes, lam, init=init, max_iter=max_iter)
        init = (w, b)
        logits = zh @ w.T + b
        top1 = float((logits.argmax(1) == yh).float().mean()) * 100.0
        scores[lam] = top1
        k = (-top1, float(F.cross_entropy(logits, yh)))
        if key is None or k < key:
            key, best = k, lam
    return best, scores


def fit_probe(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    holdout: Tensor | None = None,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    *,
    max_iter: int = 200,
) -> LinearHead:
    """Fit the probe head on features ``x`` (n, C) and labels ``y``.

    With several ``l2_grid`` values, each is fitted on the images outside ``holdout`` (a boolean mask)
    and scored on those inside (top-1, ties: lower cross-entropy); the best is then refitted on all.
    """
    x = x.to(torch.float32)
    grid = sorted({float(v) for v in l2_grid}, reverse=True)  # strongest first: warm starts get easier
    if not grid:
        raise ValueError("l2_grid is empty")
    scores: dict[float, float] = {}
    best = grid[0]
    if len(grid) > 1:
        best, scores = _choose_l2(x, y, num_classes, holdout, grid, max_iter)
    z, mu, sd = _standardize(x)
    w, b = fit_logistic(z, y, num_classes, best, max_iter=max_iter)
    w_raw, b_raw = _fold(w, b, mu, sd)
    return LinearHead(w_raw, b_raw, best, scores)
