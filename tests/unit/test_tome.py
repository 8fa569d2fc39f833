"""ToMe merging and prune-then-merge inside the model, against a per-image naive forward."""

import math

import pytest
import torch
from test_merging import cos, reference_tome
from tolerances import assert_close_normwise, vit_rtol

import renyiprune as rp
from renyiprune.core.merging import bipartite_matching
from renyiprune.models.model import VisionTransformer
from renyiprune.planning.budget import VitShape, tome_counts
from renyiprune.planning.flops import count_gmacs

#: small_vit()'s shape for the tolerance policy: 6 blocks, width 48, 3 heads, 8 x 8 patches + CLS.
SMALL_VIT = dict(depth=6, dim=48, heads=3, tokens=65)
#: float64 model against per-image loops (tests/tolerances.py).
RTOL = vit_rtol(torch.float64, **SMALL_VIT)


def small_vit():
    torch.manual_seed(0)
    m = VisionTransformer(img_size=64, patch_size=8, embed_dim=48, depth=6, num_heads=3, num_classes=10)
    return m.double().eval()


def attention(blk, t, size):
    """Explicit attention of one image with proportional attention; returns output and keys."""
    N, C = t.shape
    H = blk.attn.num_heads
    qkv = blk.attn.qkv(t).reshape(N, 3, H, C // H).permute(1, 2, 0, 3)
    q, k, v = qkv[0], qkv[1], qkv[2]
    s = q @ k.transpose(-1, -2) / math.sqrt(C // H) + torch.log(size)[:, 0][None, None, :]
    p = torch.softmax(s, dim=-1)
    return blk.attn.proj((p @ v).transpose(0, 1).reshape(N, C)), k.mean(0), p


def naive_forward(m, img, reduce):
    t = torch.cat([m.cls_token, m.patch_embed(img[None])], dim=1)[0] + m.pos_embed[0]
    size = torch.ones(t.shape[0], 1, dtype=t.dtype)
    for i, blk in enumerate(m.blocks):
        a, keys, p = attention(blk, blk.norm1(t), size)
        t = t + a
        t, size = reduce(i, t, size, keys, p)
        t = t + blk.mlp(blk.norm2(t))
    return m.head(m.norm(t)[0])


@pytest.mark.numerics
@pytest.mark.parametrize("r", [4, 12, [0, 8, 0, 20, 3, 1]])
def test_tome_matches_naive(r):
    m = small_vit()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    rs = r if isinstance(r, list) else [r] * 6

    def reduce(i, t, size, keys, p):
        return reference_tome(t, size, keys, rs[i]) if rs[i] else (t, size)

    with torch.no_grad():
        want = torch.stack([naive_forward(m, img, reduce) for img in x])
        rp.patch(m, method="tome", r=r)
        got = m(x)
    assert_close_normwise(got, want, RTOL)


@pytest.mark.numerics
def test_prune_then_merge_matches_naive():
    m = small_vit()
    torch.manual_seed(2)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    locs, keep = (1, 3), 0.6

    def reduce(i, t, size, keys, p):
        if i not in locs:
            return t, size
        n = t.shape[0] - 1
        ent = -(p * torch.log(p)).sum(-1).mean(0)[1:]  # Shannon entropy of each patch row
        k = math.ceil(round(keep * n, 6))
        kept = sorted(torch.argsort(-ent, descending=True)[:k].tolist())
        groups = {j: [j] for j in kept}
        for j in range(n):
            if j not in kept:
                best = max(kept, key=lambda c: cos(keys[1 + j], keys[1 + c]))
                groups[best].append(j)
        rows, sizes = [t[0]], [size[0]]
        for j in kept:
            s = sum(size[1 + g] for g in groups[j])
            rows.append(sum(t[1 + g] * size[1 + g] for g in groups[j]) / s)
            sizes.append(s)
        return torch.stack(rows), torch.stack(sizes)

    with torch.no_grad():
        want = torch.stack([naive_forward(m, img, reduce) for img in x])
        rp.patch(m, keep_rate=keep, criterion="shannon", locations=locs, removed="merge")
        got = m(x)
    assert_close_normwise(got, want, RTOL)
    assert [rec.kept.shape[1] for rec in m.renyiprune.records] == [39, 24]


def test_tome_gmacs_and_budgets():
    m = rp.create_model("deit_tiny_patch16_224")
    shape = VitShape.of(m)
    full = count_gmacs(m)
    rp.patch(m, method="tome", r=16)
    # the counter also sees the matching's similarity products (about 0.5 %)
    assert count_gmacs(m) == pytest.approx(shape.gmacs(tome_counts(shape, [16] * 12)), rel=0.01)
    assert count_gmacs(m) == pytest.approx(0.622, abs=0.01)  # method notes: ToMe r=16 on DeiT-Tiny
    for method, kw in (("tome", {}), ("prune", dict(criterion="evit", removed="fuse"))):
        for budget in (0.75, 0.5):
            rp.patch(m, method=method, budget=budget, **kw)
            g = count_gmacs(m)
            assert budget * full * 0.95 <= g <= budget * full * 1.01


def test_decreasing_schedule_and_errors():
    m = small_vit()
    rp.patch(m, method="tome", r=4, schedule="decreasing")
    assert m.renyiprune.merge_r == [8, 6, 5, 3, 2, 0]
    with pytest.raises(ValueError, match="removed"):
        rp.patch(m, removed="vanish")
    with pytest.raises(ValueError, match="method"):
        rp.patch(m, method="prune-ish")
    rp.unpatch(m)
    assert type(m) is VisionTransformer and all(type(b).__name__ == "Block" for b in m.blocks)


def test_entropy_bonus_orders_merges():
    torch.manual_seed(3)
    metric = torch.randn(2, 21, 4)
    bonus = torch.randn(2, 11) * 1e3  # dominates similarity: the r A tokens with the largest bonus merge
    bonus[:, 0] = 1e9  # CLS stays protected whatever its bonus
    m = bipartite_matching(metric, 4, bonus=bonus)
    for b in range(2):
        want = sorted(torch.argsort(bonus[b, 1:], descending=True)[:4].add(1).tolist())
        assert sorted(m.merged[b].tolist()) == want


@pytest.mark.numerics
@pytest.mark.parametrize("order", ["entropy", "cls_attention"])
def test_entropy_aware_tome_matches_naive(order):
    """Each registered merge order against its naive formula: Shannon row entropy (diffuse merges first)
    or minus the CLS attention a token receives (ignored tokens merge first), z-scored per image."""
    m = small_vit()
    torch.manual_seed(4)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    weight, r = 0.5, 6

    def reduce(i, t, size, keys, p):
        if order == "entropy":
            h = -(p * torch.log(p)).sum(-1).mean(0)  # Shannon entropy of each token's row, mean over heads
        else:
            h = -p[:, 0, :].mean(0)  # minus the CLS query's attention to each token, mean over heads
        z = (h - h.mean()) / h.std(correction=0)
        bonus = weight * z[::2]
        # reference_tome with the bonus: re-implemented order on top of its similarities
        N = t.shape[0]
        A, Bs = list(range(0, N, 2)), list(range(1, N, 2))
        best = {}
        for a_i, i in enumerate(A):
            if i == 0:
                continue
            sims = [cos(keys[i], keys[j]) for j in Bs]
            j = max(range(len(Bs)), key=lambda t_: sims[t_])
            best[i] = (sims[j] + float(bonus[a_i]), Bs[j])
        merged = sorted(best, key=lambda i: -best[i][0])[:r]
        groups = {j: [j] for j in Bs}
        for i in merged:
            groups[best[i][1]].append(i)
        out = [t[i] for i in A if i not in merged] + [
            sum(t[g] * size[g] for g in groups[j]) / sum(size[g] for g in groups[j]) for j in Bs]
        sizes = [size[i] for i in A if i not in merged] + [sum(size[g] for g in groups[j]) for j in Bs]
        return torch.stack(out), torch.stack(sizes)

    with torch.no_grad():
        want = torch.stack([naive_forward(m, img, reduce) for img in x])
        rp.patch(m, method="tome", r=r, entropy_weight=weight, alpha=1.0, merge_order=order)
        assert m.renyiprune.merge_order == order
        got = m(x)
        assert_close_normwise(got, want, RTOL)
        plain = rp.patch(m, method="tome", r=r)(x)
        assert torch.equal(rp.patch(m, method="tome", r=r, entropy_weight=0.0)(x), plain)
    with pytest.raises(ValueError, match="unknown merge order"):
        rp.patch(m, method="tome", r=r, entropy_weight=0.1, merge_order="loudness")
