"""Analytic GMACs from token counts agree with FlopCounterMode; budgets are met from below."""

import pytest
import torch

import renyiprune as rp
from renyiprune.planning.budget import (
    VitShape,
    prune_counts,
    solve_keep_rate,
    solve_tome_r,
    tome_counts,
    tome_macs,
)
from renyiprune.planning.flops import count_gmacs


@pytest.fixture(scope="module")
def tiny():
    return rp.create_model("deit_tiny_patch16_224")


def test_unpruned_deit_tiny(tiny):
    shape = VitShape.of(tiny)
    assert shape.gmacs(shape.unpruned()) == pytest.approx(count_gmacs(tiny), rel=1e-6)
    assert shape.gmacs(shape.unpruned()) == pytest.approx(1.254, abs=0.001)  # method notes


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("r", [0.9, 0.5, 0.25])
def test_prune_counts_match_counter(tiny, fuse, r):
    shape = VitShape.of(tiny)
    view = rp.patch(rp.create_model("deit_tiny_patch16_224"), keep_rate=r, criterion="evit", fuse=fuse)
    # the fusion einsum and the criterion's own products are not in the analytic count
    assert shape.gmacs(prune_counts(shape, (3, 6, 9), [r] * 3, fuse)) == pytest.approx(
        count_gmacs(view), rel=2e-3)


def test_tome_counts_caps():
    shape = VitShape(embed_dim=8, depth=4, num_patches=9)
    assert tome_counts(shape, [100] * 4) == [(10, 6), (6, 4), (4, 3), (3, 2)]
    assert tome_counts(shape, [2, 0, 1, 0]) == [(10, 8), (8, 8), (8, 7), (7, 7)]


@pytest.mark.parametrize("budget", [0.9, 0.75, 0.65, 0.5])
def test_solved_schedules_meet_budget(tiny, budget):
    shape = VitShape.of(tiny)
    full = shape.gmacs(shape.unpruned())
    r = solve_keep_rate(shape, budget, (3, 6, 9), fuse=True)
    g = shape.gmacs(prune_counts(shape, (3, 6, 9), [r] * 3, True))
    assert g <= budget * full
    # one more kept token at every stage would exceed the budget: the largest schedule below it
    assert shape.gmacs(prune_counts(shape, (3, 6, 9), [min(1.0, r + 0.01)] * 3, True)) > budget * full
    t = solve_tome_r(shape, budget)
    assert shape.gmacs(tome_counts(shape, [t] * 12), tome_macs(shape, [t] * 12)) <= budget * full
    assert shape.gmacs(tome_counts(shape, [t - 1] * 12), tome_macs(shape, [t - 1] * 12)) > budget * full


def test_bad_budget(tiny):
    shape = VitShape.of(tiny)
    with pytest.raises(ValueError, match="budget"):
        solve_keep_rate(shape, 1.5, (3, 6, 9))
    with pytest.raises(ValueError, match="below"):
        solve_keep_rate(shape, 0.1, (9,))
    torch.manual_seed(0)
