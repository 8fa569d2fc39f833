"""cls_value, pagerank, evit_renyi and diverse against naive float64 loops; they plug into patch()."""

import math

import pytest
import torch

import renyiprune as rp
from renyiprune.core.attention import Operands
from renyiprune.core.criteria import CRITERIA, AttentionContext, attention_logits, make_criterion
from renyiprune.models.model import VisionTransformer

pytestmark = pytest.mark.numerics


def qkv(seed=0, B=2, H=3, N=7, d=4):
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(3, B, H, N, d, generator=g, dtype=torch.float64)).unbind(0)


def ctx(seed=0, fast=False, **kw):
    q, k, v = qkv(seed, **kw)
    logits = attention_logits(q, k, 0.5)
    n = logits.shape[-1] - 1
    return AttentionContext(logits, n, operands=Operands(q, k, v, 0.5), reuse_logits=fast)


def naive_probs(seed=0, **kw):
    q, k, v = qkv(seed, **kw)
    B, H, N, _ = q.shape
    p = torch.zeros(B, H, N, N, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                s = [0.5 * float(q[b, h, i] @ k[b, h, j]) for j in range(N)]
                z = sum(math.exp(x) for x in s)
                for j in range(N):
                    p[b, h, i, j] = math.exp(s[j]) / z
    return p, v


@pytest.mark.parametrize("fast", [False, True])
def test_cls_value_is_attention_times_value_norm(fast):
    p, v = naive_probs(1)
    B, H, N, _ = p.shape
    ref = torch.zeros(B, N - 1, dtype=torch.float64)
    for b in range(B):
        for j in range(1, N):
            ref[b, j - 1] = sum(p[b, h, 0, j] * math.sqrt(sum(x * x for x in v[b, h, j].tolist()))
                                for h in range(H)) / H  # fmt: skip
    c = ctx(1, fast)
    if fast:
        assert c.probs is not None and c._logits is None  # the buffer became the probabilities in place
    torch.testing.assert_close(CRITERIA["cls_value"](c).double(), ref)


@pytest.mark.parametrize("iterations", [1, 2, 5])
def test_pagerank_is_a_power_of_the_head_mean_attention(iterations):
    p, _ = naive_probs(2)
    a = p.mean(dim=1)  # (B, N, N)
    B, N, _ = a.shape
    ref = torch.zeros(B, N - 1, dtype=torch.float64)
    for b in range(B):
        s = [1.0 / N] * N
        for _ in range(iterations):
            s = [sum(s[i] * float(a[b, i, j]) for i in range(N)) for j in range(N)]
        ref[b] = torch.tensor(s[1:], dtype=torch.float64)
    got = CRITERIA["pagerank"](ctx(2, fast=True), iterations=iterations).double()
    torch.testing.assert_close(got, ref)
    if iterations == 1:  # one step from uniform: the mean attention each patch receives
        torch.testing.assert_close(got, p.mean(dim=(1, 2))[:, 1:])


def naive_renyi(row, alpha):
    row = [x for x in row if x > 0]
    if alpha == 1.0:
        return -sum(x * math.log(x) for x in row)
    if math.isinf(alpha):
        return -math.log(max(row))
    return math.log(sum(x**alpha for x in row)) / (1 - alpha)


@pytest.mark.parametrize("alpha", [1.0, 2.0, 3.0, math.inf])
@pytest.mark.parametrize("sharpness", [0.5, 2.0])
def test_evit_renyi_weights_heads_by_the_focus_of_their_cls_row(alpha, sharpness):
    p, _ = naive_probs(3)
    B, H, N, _ = p.shape
    ref = torch.zeros(B, N - 1, dtype=torch.float64)
    for b in range(B):
        w = [math.exp(-sharpness * naive_renyi(p[b, h, 0].tolist(), alpha)) for h in range(H)]
        w = [x / sum(w) for x in w]
        for j in range(1, N):
            ref[b, j - 1] = sum(w[h] * p[b, h, 0, j] for h in range(H))
    got = CRITERIA["evit_renyi"](ctx(3, fast=True), alpha=alpha, sharpness=sharpness).double()
    torch.testing.assert_close(got, ref)


def test_evit_renyi_without_sharpness_is_evit():
    c = ctx(4)
    torch.testing.assert_close(CRITERIA["evit_renyi"](c, sharpness=0.0), CRITERIA["evit"](c))


def test_bad_options_and_a_context_without_values_fail_clearly():
    with pytest.raises(ValueError, match="iterations"):
        make_criterion("pagerank", iterations=0)
    with pytest.raises(ValueError, match="sharpness"):
        make_criterion("evit_renyi", sharpness=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        make_criterion("evit_renyi", alpha=-1.0)
    with pytest.raises(ValueError, match="values"):
        CRITERIA["cls_value"](AttentionContext(torch.randn(1, 2, 5, 5), 4))


def test_hybrid_accepts_any_registered_base():
    c = ctx(5)
    got = CRITERIA["hybrid"](c, lam=0.0, base="cls_value")
    assert torch.equal(got.argsort(1), CRITERIA["cls_value"](c).argsort(1))
    with pytest.raises(ValueError, match="base"):
        make_criterion("hybrid", base="hybrid")


@pytest.mark.parametrize("criterion", ["cls_value", "pagerank", "evit_renyi", "diverse"])
@pytest.mark.parametrize("removed", ["fuse", "merge"])
def test_new_cls_criteria_prune_a_model_as_their_scores_say(criterion, removed):
    """In a patched model the kept patches at the first location are the top scores of the criterion
    applied to that block's own attention (computed here by hand from its q, k, v)."""
    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=4, num_heads=3, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    captured = {}
    blk = m.blocks[1]
    blk.register_forward_pre_hook(lambda mod, args: captured.setdefault("x", args[0]))
    rp.patch(m, keep_rate=0.5, criterion=criterion, locations=(1, 2), removed=removed)
    with torch.no_grad():
        out = m(x)
        q, k, v = blk.attn.qkv_heads(blk.norm1(captured["x"]))
        c = AttentionContext(attention_logits(q, k, blk.attn.scale), 16, operands=Operands(key=k, value=v))
        ref = CRITERIA[criterion](c).topk(8, dim=1).indices.sort(dim=1).values
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert torch.equal(m.renyiprune.records[0].kept, ref)


@pytest.mark.parametrize("base", ["evit", "headvar"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
def test_diverse_is_the_base_minus_redundancy_to_higher_ranked_patches(base, beta):
    c = ctx(6)
    q, k, v = qkv(6)
    score = CRITERIA[base](ctx(6)).double()
    B, H, N, d = k.shape
    kbar = k.mean(dim=1)  # (B, N, d) head-mean keys
    red = torch.zeros(B, N - 1, dtype=torch.float64)
    for b in range(B):
        for j in range(N - 1):
            best = -1.0
            for i in range(N - 1):
                if score[b, i] > score[b, j]:
                    ki, kj = kbar[b, i + 1], kbar[b, j + 1]
                    best = max(best, float(ki @ kj) / float(ki.norm() * kj.norm()))
            red[b, j] = best

    def z(s):
        m = s.mean(dim=1, keepdim=True)
        return (s - m) / (s - m).pow(2).mean(dim=1, keepdim=True).sqrt()

    got = CRITERIA["diverse"](c, beta=beta, base=base).double()
    torch.testing.assert_close(got, z(score) - beta * z(red), atol=1e-5, rtol=1e-5)
    if beta == 0.0:
        assert torch.equal(got.argsort(1), score.argsort(1))


def test_diverse_prunes_a_near_duplicate_before_a_distinct_patch():
    """Two patches with equal keys: the one the base ranks lower is fully redundant and goes first."""
    B, H, N, d = 1, 2, 5, 4
    k = torch.randn(B, H, N, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    k[:, :, 3] = k[:, :, 2]  # patch 2 (key token 3) duplicates patch 1 (key token 2)
    q = torch.zeros(B, H, N, d, dtype=torch.float64)
    logits = torch.zeros(B, H, N, N, dtype=torch.float64)
    logits[:, :, 0, 1:] = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)  # CLS prefers 1 > 2 > 3 > 4
    c = AttentionContext(logits, 4, operands=Operands(q, k))
    assert CRITERIA["evit"](c).argmin().item() == 3  # EViT prunes patch 4 first
    assert CRITERIA["diverse"](c, beta=4.0).argmin().item() == 2  # diverse prunes the duplicate


def test_diverse_options_fail_clearly():
    with pytest.raises(ValueError, match="beta"):
        make_criterion("diverse", beta=-1.0)
    with pytest.raises(ValueError, match="base"):
        make_criterion("diverse", base="diverse")
    with pytest.raises(ValueError, match="keys"):
        CRITERIA["diverse"](AttentionContext(torch.randn(1, 2, 5, 5), 4))
