"""Token selection and fusion against a per-image Python reference."""

import math

import pytest
import torch

from renyiprune.selection import keep_count, select_tokens


@pytest.mark.parametrize(
    "n,r,k",
    [
        (196, 0.7, 138),
        (196, 0.5, 98),
        (10, 0.7, 7),
        (196, 1.0, 196),
        (5, 0.01, 1),
        (137, 0.7, 96),
        (3, 0.9, 3),
    ],
)
def test_keep_count(n, r, k):
    assert keep_count(n, r) == k == max(1, math.ceil(round(r * n, 6)))


@pytest.mark.parametrize("r", [0.0, -0.1, 1.5, float("nan")])
def test_keep_rate_range(r):
    with pytest.raises(ValueError, match="keep rate"):
        keep_count(10, r)


def reference(x, scores, k, cls_attn, fuse):
    out = []
    for b in range(x.shape[0]):
        n = scores.shape[1]
        order = sorted(range(n), key=lambda i: -float(scores[b, i]))[:k]
        kept = sorted(order)
        toks = [x[b, 0]] + [x[b, 1 + i] for i in kept]
        pruned = [i for i in range(n) if i not in kept]
        extra = list(range(n, x.shape[1] - 1))  # an earlier fused token
        if fuse and (pruned or extra):
            idx = [1 + i for i in pruned] + [1 + i for i in extra]
            w = torch.stack([cls_attn[b, j] for j in idx])
            toks.append(sum(w[t] * x[b, j] for t, j in enumerate(idx)) / w.sum())
        out.append((torch.stack(toks), kept))
    return out


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("carried", [0, 1])
def test_matches_reference(fuse, carried):
    torch.manual_seed(carried)
    B, n, C, k = 4, 12, 5, 7
    x = torch.randn(B, 1 + n + carried, C, dtype=torch.float64)
    scores = torch.randn(B, n, dtype=torch.float64)
    cls_attn = torch.rand(B, 1 + n + carried, dtype=torch.float64)
    got, kept = select_tokens(x, scores, k, cls_attn=cls_attn, fuse=fuse)
    ref = reference(x, scores, k, cls_attn, fuse)
    for b in range(B):
        assert kept[b].tolist() == ref[b][1]
        torch.testing.assert_close(got[b], ref[b][0])
    assert got.shape[1] == 1 + k + (1 if fuse else 0)


def test_nothing_pruned_is_identity():
    x = torch.randn(2, 9, 3)
    got, kept = select_tokens(x, torch.randn(2, 8), 8, cls_attn=torch.rand(2, 9), fuse=True)
    assert torch.equal(got, x) and kept.tolist() == [list(range(8))] * 2
