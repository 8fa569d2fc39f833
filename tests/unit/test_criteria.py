"""Each criterion against a float64 reference computed from explicit probabilities."""

import math

import numpy as np
import pytest
import torch

from renyiprune import list_criteria
from renyiprune.core.attention import AttentionContext
from renyiprune.core.criteria import make_criterion

pytestmark = pytest.mark.numerics


def probs64(logits):
    z = logits.double()
    return torch.softmax(z, dim=-1).numpy()


def h_naive(p, alpha, axis=-1):
    """Rényi entropy of distributions p (float64) along axis, from the definition."""
    p = p / p.sum(axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        if alpha == 1:
            return -np.where(p > 0, p * np.log(p), 0).sum(axis=axis)
        if math.isinf(alpha):
            return -np.log(p.max(axis=axis))
        return np.log((p**alpha).sum(axis=axis)) / (1 - alpha)


@pytest.fixture
def ctx():
    torch.manual_seed(0)
    B, H, n = 3, 4, 9
    N = n + 1
    return AttentionContext(torch.randn(B, H, N, N) * 2, num_patches=n)


def fresh(ctx):
    return AttentionContext(ctx.logits, ctx.num_patches)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 3.0, math.inf])
@pytest.mark.parametrize("heads", ["mean", "pooled"])
@pytest.mark.parametrize("cls_key", ["include", "exclude"])
def test_renyi_row(ctx, alpha, heads, cls_key):
    p = probs64(ctx.logits)  # (B, H, N, N)
    if cls_key == "exclude":
        p = p[..., 1:]
    rows = p[:, :, 1:]  # patch queries
    if heads == "mean":
        want = -h_naive(rows, alpha).mean(axis=1)
    else:
        want = -h_naive((rows / rows.sum(-1, keepdims=True)).mean(axis=1), alpha)
    fn = make_criterion("renyi", alpha=alpha, heads=heads, cls_key=cls_key)
    np.testing.assert_allclose(fn(fresh(ctx)).numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, math.inf])
def test_renyi_paper_is_the_patch_keys_only_row(ctx, alpha):
    """``renyi_paper``: each patch query's row over the patch keys only (CLS column dropped, renormalized),
    per-head entropies averaged; float64 reference from the definition."""
    p = probs64(ctx.logits)[:, :, 1:, 1:]  # patch queries x patch keys
    want = -h_naive(p / p.sum(-1, keepdims=True), alpha).mean(axis=1)
    got = make_criterion("renyi_paper", alpha=alpha)(fresh(ctx)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and it differs from the default reading (CLS key in) on the same attention
    assert not np.allclose(got, make_criterion("renyi", alpha=alpha)(fresh(ctx)).numpy(), atol=1e-3)


@pytest.mark.parametrize("alpha", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("heads", ["mean", "pooled"])
@pytest.mark.parametrize("cls_key", ["include", "exclude"])
def test_renyi_column(ctx, alpha, heads, cls_key):
    p = probs64(ctx.logits)
    if cls_key == "exclude":
        p = p[..., 1:]
        p = p / p.sum(-1, keepdims=True)
        cols = p  # keys 1..n are columns 0..n-1
    else:
        cols = p[..., 1:]
    if heads == "pooled":
        cols = cols.mean(axis=1, keepdims=True)
    want = -h_naive(cols, alpha, axis=-2).mean(axis=1)  # column normalized over queries
    fn = make_criterion("renyi", alpha=alpha, direction="column", heads=heads, cls_key=cls_key)
    np.testing.assert_allclose(fn(fresh(ctx)).numpy(), want, rtol=1e-5, atol=1e-5)


def test_shannon_is_renyi_one(ctx):
    a = make_criterion("shannon")(fresh(ctx))
    b = make_criterion("renyi", alpha=1.0)(fresh(ctx))
    assert torch.equal(a, b)


def test_evit_is_mean_cls_attention(ctx):
    want = probs64(ctx.logits)[:, :, 0, 1:].mean(axis=1)
    np.testing.assert_allclose(make_criterion("evit")(fresh(ctx)).numpy(), want, rtol=1e-5, atol=1e-7)
    # the same whether or not probabilities were computed first
    c = fresh(ctx)
    _ = c.probs
    np.testing.assert_allclose(make_criterion("evit")(c).numpy(), want, rtol=1e-5, atol=1e-7)


def test_random_is_seeded_and_per_image():
    logits = torch.zeros(4, 2, 50, 50)
    fn = make_criterion("random", seed=3)
    a = fn(AttentionContext(logits, 49, stage=0, step=5))
    b = fn(AttentionContext(logits, 49, stage=0, step=5))
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # images differ
    assert not torch.equal(a, fn(AttentionContext(logits, 49, stage=1, step=5)))
    assert not torch.equal(a, fn(AttentionContext(logits, 49, stage=0, step=6)))
    assert not torch.equal(a, make_criterion("random", seed=4)(AttentionContext(logits, 49, stage=0, step=5)))


def test_low_entropy_scores_higher():
    # patch 1 attends to one key, patch 2 uniformly: patch 1 must get the higher renyi score
    logits = torch.zeros(1, 1, 3, 3)
    logits[0, 0, 1] = torch.tensor([0.0, 20.0, 0.0])
    s = make_criterion("renyi", alpha=2.0)(AttentionContext(logits, 2))
    assert s[0, 0] > s[0, 1]


def test_registry_errors():
    assert {"renyi", "shannon", "evit", "random"} <= set(list_criteria())
    with pytest.raises(ValueError, match="unknown criterion"):
        make_criterion("nope")
    with pytest.raises(ValueError, match="no option"):
        make_criterion("evit", alpha=2)
    with pytest.raises(ValueError, match="alpha"):
        make_criterion("renyi", alpha=-1)
    with pytest.raises(ValueError, match="direction"):
        make_criterion("renyi", direction="diagonal")
