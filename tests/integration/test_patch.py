"""patch()/unpatch() on our ViT: token counts, equality with the unpruned model, and a naive reference."""

import math

import pytest
import torch
from tolerances import assert_close_normwise, vit_rtol

import renyiprune as rp
from renyiprune.core.state import is_patched
from renyiprune.models.model import VisionTransformer
from renyiprune.planning.flops import count_gmacs

CRITERIA = ["renyi", "shannon", "evit", "random"]


#: small_vit()'s shape for the tolerance policy: 6 blocks, width 48, 3 heads, 8 x 8 patches + CLS.
SMALL_VIT = dict(depth=6, dim=48, heads=3, tokens=65)


def small_vit(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    cfg = dict(img_size=64, patch_size=8, embed_dim=48, depth=6, num_heads=3, num_classes=10)
    cfg.update(kw)
    return VisionTransformer(**cfg).to(dtype).eval()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 64, 64)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("fuse,fusion", [(False, None), (True, "evit"), (True, "renorm")])
@pytest.mark.parametrize("r", [0.9, 0.7, 0.5, 0.01])
def test_token_counts_and_patch_index(images, criterion, fuse, fusion, r):
    """EViT's fusion (the default) ranks the fused token with the patches: n = kept + 1 from the second
    location on, and a kept fused token has patch_index -1; renorm never ranks it (n = kept)."""
    m = rp.patch(small_vit(), keep_rate=r, criterion=criterion, locations=(1, 3, 4), fuse=fuse, fusion=fusion)
    with torch.no_grad():
        m(images)
    n = 64
    prev = torch.arange(n).expand(3, -1)
    assert len(m.renyiprune.records) == 3
    for rec in m.renyiprune.records:
        k = math.ceil(round(r * n, 6))
        assert rec.kept.shape == (3, k) and rec.scores.shape == (3, n)
        assert rec.num_fused == (1 if fuse else 0)
        assert (rec.kept.diff(dim=1) > 0).all()  # original order, no repeats
        assert torch.equal(rec.patch_index, prev.gather(1, rec.kept))
        assert ((rec.patch_index >= 0) | (rec.patch_index == -1)).all()  # -1: a kept (earlier) fused token
        for row in rec.patch_index.tolist():
            real = [i for i in row if i >= 0]
            assert len(set(real)) == len(real)
        if fusion == "evit":  # the new fused token is the last candidate of the next location
            prev, n = torch.cat([rec.patch_index, torch.full((3, 1), -1)], dim=1), k + 1
        else:
            assert (rec.patch_index >= 0).all()
            prev, n = rec.patch_index, k


@pytest.mark.numerics
@pytest.mark.parametrize("criterion", CRITERIA)
def test_keep_one_and_no_locations_equal_unpruned(images, criterion):
    for dtype in (torch.float64, torch.float32):
        m = small_vit(dtype)
        x = images.to(dtype)
        with torch.no_grad():
            ref = m(x)
            rp.patch(m, keep_rate=1.0, criterion=criterion, fuse=True, locations=(0, 2, 5))
            # Explicit attention in three blocks against SDPA: different kernels, rounding differs.
            assert_close_normwise(m(x), ref, vit_rtol(dtype, **SMALL_VIT))
            # No pruning block: the same kernels on the same inputs, bit for bit.
            rp.patch(m, keep_rate=0.5, criterion=criterion, locations=())
            torch.testing.assert_close(m(x), ref, atol=0, rtol=0)
            rp.unpatch(m)
            assert type(m) is VisionTransformer and not hasattr(m, "renyiprune")
            torch.testing.assert_close(m(x), ref, atol=0, rtol=0)


def naive_pruned_forward(m, x, keep_rate, locations, alpha, fuse):
    """One image at a time, explicit softmax, entropy from probabilities, Python-loop selection."""
    outs, kept_all = [], []
    for img in x:
        t = m.patch_embed(img[None])
        t = torch.cat([m.cls_token, t], dim=1) + m.pos_embed
        t = t[0]
        kept_img = []
        for i, blk in enumerate(m.blocks):
            h = blk.norm1(t)
            N, C = h.shape
            H = blk.attn.num_heads
            qkv = blk.attn.qkv(h).reshape(N, 3, H, C // H).permute(1, 2, 0, 3)
            q, k, v = qkv[0], qkv[1], qkv[2]
            p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // H), dim=-1)  # (H, N, N)
            a = (p @ v).transpose(0, 1).reshape(N, C)
            t = t + blk.attn.proj(a)
            if i in locations:
                nf = 1 if (fuse and len(kept_img) > 0) else 0
                n = N - 1 - nf
                if alpha == 1:
                    ent = -(p * torch.log(p)).sum(-1)
                else:
                    ent = torch.log((p**alpha).sum(-1)) / (1 - alpha)
                score = -ent.mean(0)[1 : 1 + n]
                kk = math.ceil(round(keep_rate * n, 6))
                kept = sorted(torch.argsort(score, descending=True)[:kk].tolist())
                rows = [t[0]] + [t[1 + j] for j in kept]
                if fuse:
                    cls = p[:, 0].mean(0)
                    idx = [1 + j for j in range(n) if j not in kept] + list(range(1 + n, N))
                    w = cls[idx] / cls[idx].sum()
                    rows.append((w[:, None] * t[idx]).sum(0))
                t = torch.stack(rows)
                kept_img.append(kept)
            t = t + blk.mlp(blk.norm2(t))
        outs.append(m.head(m.norm(t)[0]))
        kept_all.append(kept_img)
    return torch.stack(outs), kept_all


@pytest.mark.numerics
@pytest.mark.parametrize("alpha", [1.0, 2.0])
@pytest.mark.parametrize("fuse", [False, True])
def test_matches_naive_reference(images, alpha, fuse):
    m = small_vit(torch.float64)
    x = images.double()
    with torch.no_grad():
        want, want_kept = naive_pruned_forward(m, x, 0.6, (1, 3, 4), alpha, fuse)
        # The reference fuses by the renormalized rule (integration/test_fusion.py: EViT's, the default).
        fusion = "renorm" if fuse else None
        rp.patch(m, keep_rate=0.6, criterion="renyi", alpha=alpha, locations=(1, 3, 4), fuse=fuse,
                 fusion=fusion)
        got = m(x)
    assert_close_normwise(got, want, vit_rtol(torch.float64, **SMALL_VIT))  # float64, per-image loops
    for s, rec in enumerate(m.renyiprune.records):
        assert rec.kept.tolist() == [want_kept[b][s] for b in range(x.shape[0])]


def test_per_stage_settings_and_repatch(images):
    m = small_vit()
    rp.patch(m, keep_rate=[0.9, 0.5], criterion=["renyi", "evit"], alpha=[2.0, 1.0], locations=(1, 4))
    with torch.no_grad():
        m(images)
    assert [r.kept.shape[1] for r in m.renyiprune.records] == [58, 29]
    assert "evit" in m.renyiprune.describe()
    rp.patch(m, keep_rate=0.5, locations=(2,))  # reconfigures
    with torch.no_grad():
        m(images)
    assert [r.location for r in m.renyiprune.records] == [2]
    assert sum(type(b).__name__.startswith("Pruning") for b in m.blocks) == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(keep_rate=0.0), "keep rate"),
        (dict(keep_rate=1.5), "keep rate"),
        (dict(locations=(3, 9)), "out of range"),
        (dict(locations=(3, 1)), "increasing"),
        (dict(alpha=-1), "alpha"),
        (dict(criterion="bogus"), "unknown criterion"),
        (dict(keep_rate=[0.5, 0.5]), "locations"),
    ],
)
def test_bad_arguments(kwargs, match):
    m = small_vit()
    args = dict(locations=(1, 3, 4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        rp.patch(m, **args)
    assert not is_patched(m)


def test_not_a_vit():
    with pytest.raises(TypeError, match="blocks"):
        rp.patch(torch.nn.Linear(3, 3))


def test_gmacs_match_analytic_count():
    m = small_vit(num_classes=10)
    C, n0, L = 48, 64, 6

    def analytic(counts):
        total = n0 * C * 3 * 64 + C * 10  # patch embedding (patch 8x8x3) and head
        for na, nm in counts:
            total += 3 * na * C * C + 2 * na * na * C + na * C * C + 8 * nm * C * C
        return total / 1e9

    assert count_gmacs(m) == pytest.approx(analytic([(n0 + 1, n0 + 1)] * L), rel=1e-6)
    rp.patch(m, keep_rate=0.7, criterion="renyi", locations=(1, 3, 4))
    counts, n = [], n0
    for i in range(L):
        na = n + 1
        if i in (1, 3, 4):
            n = math.ceil(round(0.7 * n, 6))
        counts.append((na, n + 1))
    # The Shannon entropy (-sum p log p, attention.Statistics) takes no matrix product, whether the block
    # streams (the default) or computes the explicit matrix: the count is the method notes' formula.
    assert count_gmacs(m) == pytest.approx(analytic(counts), rel=1e-6)
    m.renyiprune.attention = "explicit"
    assert count_gmacs(m) == pytest.approx(analytic(counts), rel=1e-6)
