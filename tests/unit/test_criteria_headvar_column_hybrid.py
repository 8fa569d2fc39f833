"""headvar, column_norm and hybrid against naive loop references; they plug into patch()."""

import math

import pytest
import torch

import renyiprune as rp
from renyiprune.core.criteria import CRITERIA, AttentionContext
from renyiprune.core.entropy import renyi_entropy
from renyiprune.models.model import VisionTransformer

pytestmark = pytest.mark.numerics


def zscore(s):
    """Naive per-image z-score in float64 (population deviation)."""
    s = s.double()
    mean = s.mean(dim=1, keepdim=True)
    return (s - mean) / ((s - mean).pow(2).mean(dim=1, keepdim=True).sqrt())


def ctx(seed=0, B=2, H=3, N=7):
    g = torch.Generator().manual_seed(seed)
    return AttentionContext(3 * torch.randn(B, H, N, N, generator=g, dtype=torch.float64), num_patches=N - 1)


def naive_received(c):
    p = c.logits.softmax(-1)
    B, H, N, _ = p.shape
    out = torch.zeros(B, H, N - 1, dtype=p.dtype)
    for b in range(B):
        for h in range(H):
            for j in range(1, N):
                out[b, h, j - 1] = sum(p[b, h, i, j] for i in range(N)) / N
    return out


def test_headvar_matches_naive_variance_and_mad():
    c = ctx()
    a = naive_received(c)
    B, H, n = a.shape
    var = torch.zeros(B, n, dtype=a.dtype)
    mad = torch.zeros(B, n, dtype=a.dtype)
    for b in range(B):
        for j in range(n):
            vals = sorted(float(a[b, h, j]) for h in range(H))
            mean = sum(vals) / H
            var[b, j] = sum((v - mean) ** 2 for v in vals) / H
            med = vals[H // 2]  # H = 3: the middle value
            mad[b, j] = sorted(abs(v - med) for v in vals)[H // 2]
    torch.testing.assert_close(CRITERIA["headvar"](c).double(), var)
    torch.testing.assert_close(CRITERIA["headvar"](c, robust=True).double(), mad)


@pytest.mark.parametrize("norm", [1.0, 2.0, 4.0, math.inf])
def test_column_norm_matches_naive_norm(norm):
    c = ctx(1)
    p = c.logits.softmax(-1).mean(dim=1)  # (B, N, N)
    B, N, _ = p.shape
    ref = torch.zeros(B, N - 1, dtype=p.dtype)
    for b in range(B):
        for j in range(1, N):
            col = [float(p[b, i, j]) for i in range(N)]
            ref[b, j - 1] = max(col) if math.isinf(norm) else sum(v**norm for v in col) ** (1 / norm)
    torch.testing.assert_close(CRITERIA["column_norm"](c, norm=norm).double(), ref)


def test_column_norm_ranks_like_column_renyi_of_its_order():
    """Su et al.: the l_n norm ranks keys like the Rényi-n entropy of the normalized column, up to the
    column sum; with columns of equal sum the two orders agree exactly."""
    p = torch.rand(1, 1, 6, 6).double()
    p = p / p.sum(dim=2, keepdim=True)  # every column sums to 1 (and rows need not)
    c = AttentionContext(p.log(), num_patches=5)
    c._probs = p
    cols = p[0, 0, :, 1:].T  # (5, N)
    h = renyi_entropy(cols.log(), 4.0)
    norm = CRITERIA["column_norm"](c, norm=4.0)[0]
    assert torch.equal(norm.argsort(), (-h).argsort())


@pytest.mark.parametrize("combine", ["z", "rank"])
def test_hybrid_is_the_weighted_sum_and_its_ends_rank_as_renyi_and_evit(combine):
    c = ctx(2)
    ent = -renyi_entropy(c.patches(c.logits, dim=2), 2.0).mean(dim=1)
    cls = c.logits[:, :, 0].softmax(-1).mean(dim=1)[:, 1:]

    def f(s):
        if combine == "z":  # a per-image z-score (either std convention): mean 0, proportional to s - mean
            z = zscore(s).double()
            torch.testing.assert_close(z.mean(1), torch.zeros(s.shape[0], dtype=z.dtype), atol=1e-6, rtol=0)
            ratio = (s - s.mean(1, keepdim=True)) / z
            torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), atol=1e-6, rtol=1e-5)
            return z
        return s.argsort(1).argsort(1).double() / (s.shape[1] - 1)

    for lam in (0.0, 0.3, 1.0):
        got = CRITERIA["hybrid"](c, alpha=2.0, lam=lam, combine=combine).double()
        torch.testing.assert_close(got, (1 - lam) * f(ent) + lam * f(cls), atol=1e-6, rtol=1e-6)
    assert torch.equal(CRITERIA["hybrid"](c, lam=1.0).argsort(1), cls.argsort(1))
    assert torch.equal(CRITERIA["hybrid"](c, alpha=2.0, lam=0.0).argsort(1), ent.argsort(1))
    with pytest.raises(ValueError):
        rp.patch(VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=4, num_heads=3),
                 criterion="hybrid", lam=2.0)  # fmt: skip


@pytest.mark.parametrize("criterion", ["headvar", "column_norm", "hybrid"])
@pytest.mark.parametrize("fuse", [False, True])
def test_new_criteria_prune_a_model(criterion, fuse):
    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=4, num_heads=3, num_classes=5).eval()
    rp.patch(m, keep_rate=0.5, criterion=criterion, alpha=2.0, locations=(1, 2), fuse=fuse)
    with torch.no_grad():
        out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    # with EViT's fusion the fused token is one of the 9 candidates at the second location: ceil(4.5) = 5
    assert [r.kept.shape[1] for r in m.renyiprune.records] == [8, 5 if fuse else 4]


@pytest.mark.parametrize("base", ["headvar", "column_norm"])
def test_hybrid_with_another_base_blends_that_criterion(base):
    c = ctx(3)
    cls = c.logits[:, :, 0].softmax(-1).mean(dim=1)[:, 1:]
    other = CRITERIA[base](c).double()

    got = CRITERIA["hybrid"](c, lam=0.25, base=base).double()
    ref = 0.75 * zscore(other).double() + 0.25 * zscore(cls).double()
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
