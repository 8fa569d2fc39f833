"""Token merging against per-image Python references."""

import pytest
import torch

from renyiprune.core.merging import bipartite_matching, merge_into_kept


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


def previous_merge(m, x, size):
    """The earlier vectorized merge (sizes carried as an extra column through gather/scatter_add): the
    faster ``Matching.merge`` must give the same bits, not just close values."""
    weighted = torch.cat([x * size, size], dim=-1)
    src, dst = weighted[:, ::2], weighted[:, 1::2]
    c = weighted.shape[-1]
    keep = src.gather(1, m.unmerged.unsqueeze(-1).expand(-1, -1, c))
    moved = src.gather(1, m.merged.unsqueeze(-1).expand(-1, -1, c))
    dst = dst.scatter_add(1, m.targets.unsqueeze(-1).expand(-1, -1, c), moved)
    out = torch.cat([keep, dst], dim=1)
    if m.num_prefix > 1:
        front = [t // 2 if t % 2 == 0 else keep.shape[1] + t // 2 for t in range(m.num_prefix)]
        order = front + [i for i in range(out.shape[1]) if i not in front]
        out = out[:, order]
    return out[..., :-1] / out[..., -1:], out[..., -1:]


def previous_merge_into_kept(x, size, metric, kept, n, P):
    """The earlier vectorized merge_into_kept (scatter_add over a size column)."""
    B, _, C = x.shape
    k = kept.shape[1]
    pruned = torch.ones(B, n, dtype=torch.bool).scatter(1, kept, False)
    m = metric[:, P:] / metric[:, P:].norm(dim=-1, keepdim=True).clamp_min(1e-12)
    m_kept = m.gather(1, kept.unsqueeze(-1).expand(-1, -1, m.shape[-1]))
    target = (m @ m_kept.transpose(-1, -2)).argmax(dim=-1)
    own = torch.full((B, n), -1).scatter(1, kept, torch.arange(k).expand(B, -1))
    target = torch.where(pruned, target, own)
    weighted = torch.cat([x[:, P:] * size[:, P:], size[:, P:]], dim=-1)
    acc = weighted.new_zeros(B, k, C + 1).scatter_add(1, target.unsqueeze(-1).expand(-1, -1, C + 1), weighted)
    out = torch.cat([x[:, :P], acc[..., :-1] / acc[..., -1:]], dim=1)
    return out, torch.cat([size[:, :P], acc[..., -1:]], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("P", [1, 2, 3])
@pytest.mark.parametrize("N,r", [(197, 13), (197, 90), (50, 24), (9, 4)])
def test_merge_bitwise_equal_to_previous(dtype, P, N, r):
    """Same bits as before the speed-up: with many merges per target (r close to N/2), random sizes,
    several prefix tokens, and sizes None (all 1)."""
    torch.manual_seed(N * r + P)
    B, C = 4, 24
    x = torch.randn(B, N, C, dtype=dtype)
    size = torch.randint(1, 6, (B, N, 1)).to(dtype)
    m = bipartite_matching(torch.randn(B, N, 8, dtype=dtype), r, num_prefix=P)
    for s in (size, None):
        got, got_size = m.merge(x, s)
        want, want_size = previous_merge(m, x, torch.ones_like(size) if s is None else s)
        assert torch.equal(got, want) and torch.equal(got_size, want_size)


@pytest.mark.parametrize("P", [1, 2])
def test_merge_into_kept_bitwise_equal_to_previous(P):
    torch.manual_seed(P)
    B, n, C, k = 3, 60, 16, 21
    x = torch.randn(B, P + n, C)
    size = torch.randint(1, 5, (B, P + n, 1)).float()
    metric = torch.randn(B, P + n, 8)
    kept = torch.stack([torch.randperm(n)[:k].sort().values for _ in range(B)])
    for s in (size, None):
        got, got_size = merge_into_kept(x, s, metric, kept, n, P)
        ones = torch.ones_like(size)
        want, want_size = previous_merge_into_kept(x, ones if s is None else s, metric, kept, n, P)
        assert torch.equal(got, want) and torch.equal(got_size, want_size)
