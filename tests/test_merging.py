"""Token merging against per-image Python references."""

import pytest
import torch

from renyiprune.merging import bipartite_matching, merge_into_kept


def cos(u, v):
    return float(u @ v / (u.norm() * v.norm()))


def reference_tome(x, size, metric, r):
    """ToMe's rule for one image, with dicts and loops."""
    N = x.shape[0]
    A, Bs = list(range(0, N, 2)), list(range(1, N, 2))
    best = {}
    for i in A:
        if i == 0:
            continue
        sims = [cos(metric[i], metric[j]) for j in Bs]
        j = max(range(len(Bs)), key=lambda t: sims[t])
        best[i] = (sims[j], Bs[j])
    r = min(r, len(best), len(Bs))
    merged = sorted(best, key=lambda i: -best[i][0])[:r]
    groups = {j: [j] for j in Bs}
    for i in merged:
        groups[best[i][1]].append(i)
    out, sizes = [], []
    for i in A:
        if i not in merged:
            out.append(x[i]), sizes.append(size[i])
    for j in Bs:
        s = sum(size[t] for t in groups[j])
        out.append(sum(x[t] * size[t] for t in groups[j]) / s)
        sizes.append(s)
    return torch.stack(out), torch.stack(sizes)


@pytest.mark.parametrize("N,r", [(11, 3), (10, 4), (197, 16), (5, 10), (3, 1)])
def test_bipartite_matching_matches_reference(N, r):
    torch.manual_seed(N + r)
    B, C = 3, 6
    x = torch.randn(B, N, C, dtype=torch.float64)
    size = torch.randint(1, 4, (B, N, 1)).double()
    metric = torch.randn(B, N, 5, dtype=torch.float64)
    got, got_size = bipartite_matching(metric, r).merge(x, size)
    for b in range(B):
        want, want_size = reference_tome(x[b], size[b], metric[b], r)
        torch.testing.assert_close(got[b], want)
        torch.testing.assert_close(got_size[b], want_size)
        torch.testing.assert_close(got[b, 0], x[b, 0])  # CLS first and unchanged
    assert float(got_size.sum()) == pytest.approx(float(size.sum()))  # mass is conserved


def test_merge_into_kept_matches_reference():
    torch.manual_seed(0)
    B, n, C, k = 2, 9, 4, 4
    x = torch.randn(B, 1 + n, C, dtype=torch.float64)
    size = torch.randint(1, 3, (B, 1 + n, 1)).double()
    metric = torch.randn(B, 1 + n, 3, dtype=torch.float64)
    kept = torch.stack([torch.randperm(n)[:k].sort().values for _ in range(B)])
    got, got_size = merge_into_kept(x, size, metric, kept, n)
    for b in range(B):
        ks = kept[b].tolist()
        groups = {j: [j] for j in ks}
        for i in range(n):
            if i not in ks:
                j = max(ks, key=lambda t: cos(metric[b, 1 + i], metric[b, 1 + t]))
                groups[j].append(i)
        for pos, j in enumerate(ks):
            s = sum(size[b, 1 + t] for t in groups[j])
            want = sum(x[b, 1 + t] * size[b, 1 + t] for t in groups[j]) / s
            torch.testing.assert_close(got[b, 1 + pos], want)
            torch.testing.assert_close(got_size[b, 1 + pos], s)
        assert torch.equal(got[b, 0], x[b, 0])
