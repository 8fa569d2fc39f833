"""Token selection and fusion against a per-image Python reference."""

import math

import pytest
import torch

from renyiprune.core.selection import keep_count, select_tokens


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


def reference(x, scores, k, cls_attn, fuse, fusion):
    """Per image, Python loops. evit: every non-CLS token is a candidate and the pruned ones are summed
    with their raw CLS attention; renorm: an earlier fused token (past the n scored patches) is never a
    candidate and joins the pruned patches in an average with renormalized weights."""
    out = []
    for b in range(x.shape[0]):
        n = scores.shape[1]
        order = sorted(range(n), key=lambda i: -float(scores[b, i]))[:k]
        kept = sorted(order)
        toks = [x[b, 0]] + [x[b, 1 + i] for i in kept]
        pruned = [i for i in range(n) if i not in kept]
        extra = list(range(n, x.shape[1] - 1))  # renorm: an earlier fused token
        if fuse and fusion == "evit" and pruned:
            toks.append(sum(cls_attn[b, 1 + i] * x[b, 1 + i] for i in pruned))
        if fuse and fusion == "renorm" and (pruned or extra):
            idx = [1 + i for i in pruned] + [1 + i for i in extra]
            w = torch.stack([cls_attn[b, j] for j in idx])
            toks.append(sum(w[t] * x[b, j] for t, j in enumerate(idx)) / w.sum())
        out.append((torch.stack(toks), kept))
    return out


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("carried", [0, 1])
def test_renorm_matches_reference(fuse, carried):
    """fusion="renorm": a carried fused token (carried = 1) is not scored and always re-fused."""
    torch.manual_seed(carried)
    B, n, C, k = 4, 12, 5, 7
    x = torch.randn(B, 1 + n + carried, C, dtype=torch.float64)
    scores = torch.randn(B, n, dtype=torch.float64)
    cls_attn = torch.rand(B, 1 + n + carried, dtype=torch.float64)
    got, kept = select_tokens(x, scores, k, cls_attn=cls_attn, fuse=fuse, fusion="renorm")
    ref = reference(x, scores, k, cls_attn, fuse, "renorm")
    for b in range(B):
        assert kept[b].tolist() == ref[b][1]
        torch.testing.assert_close(got[b], ref[b][0], rtol=1e-12, atol=1e-12)  # float64, sums of 13 terms
    assert got.shape[1] == 1 + k + (1 if fuse else 0)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("k", [1, 7, 11])
def test_evit_matches_reference(fuse, k):
    """fusion="evit" (the default): all 12 non-CLS tokens are scored (the last may be an earlier fused
    token: nothing distinguishes it), the pruned ones summed with their raw CLS attention."""
    torch.manual_seed(k)
    B, n, C = 4, 12, 5
    x = torch.randn(B, 1 + n, C, dtype=torch.float64)
    scores = torch.randn(B, n, dtype=torch.float64)
    cls_attn = torch.rand(B, 1 + n, dtype=torch.float64)
    got, kept = select_tokens(x, scores, k, cls_attn=cls_attn, fuse=fuse)
    ref = reference(x, scores, k, cls_attn, fuse, "evit")
    for b in range(B):
        assert kept[b].tolist() == ref[b][1]
        torch.testing.assert_close(got[b], ref[b][0], rtol=1e-12, atol=1e-12)  # float64, sums of 12 terms
    assert got.shape[1] == 1 + k + (1 if fuse else 0)


def test_evit_weights_are_raw_not_renormalized():
    """Two pruned tokens with CLS attention 0.1 and 0.3: EViT's fused token is 0.1 a + 0.3 b (total weight
    0.4), the renormalized one 0.25 a + 0.75 b."""
    x = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]], dtype=torch.float64)
    scores = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)  # token 3 kept
    cls_attn = torch.tensor([[0.4, 0.1, 0.3, 0.2]], dtype=torch.float64)
    evit, _ = select_tokens(x, scores, 1, cls_attn=cls_attn, fuse=True, fusion="evit")
    renorm, _ = select_tokens(x, scores, 1, cls_attn=cls_attn, fuse=True, fusion="renorm")
    torch.testing.assert_close(evit[0, -1], torch.tensor([0.1, 0.3], dtype=torch.float64))
    torch.testing.assert_close(renorm[0, -1], torch.tensor([0.25, 0.75], dtype=torch.float64))


def test_layouts_and_fusion_names_are_checked():
    with pytest.raises(ValueError, match="do not fit"):  # evit: every non-prefix token must be scored
        x, cls_attn = torch.randn(1, 1 + 8 + 1, 4), torch.rand(1, 10)
        select_tokens(x, torch.randn(1, 8), 3, fuse=True, cls_attn=cls_attn)
    with pytest.raises(ValueError, match="fusion must be one of evit, renorm"):
        select_tokens(torch.randn(1, 9, 4), torch.randn(1, 8), 3, fusion="mean")


@pytest.mark.parametrize("fusion", ["evit", "renorm"])
def test_nothing_pruned_is_identity(fusion):
    x = torch.randn(2, 9, 3)
    got, kept = select_tokens(x, torch.randn(2, 8), 8, cls_attn=torch.rand(2, 9), fuse=True, fusion=fusion)
    assert torch.equal(got, x) and kept.tolist() == [list(range(8))] * 2
