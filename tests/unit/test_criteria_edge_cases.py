"""Property tests: every criterion and the selection survive NaN, ±inf, ties, tiny N and tiny keep rates."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import renyiprune as rp
from renyiprune.core.attention import AttentionContext, Operands
from renyiprune.core.criteria import make_criterion
from renyiprune.core.selection import keep_count, select_tokens
from renyiprune.models.model import VisionTransformer

SPECIAL = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1.0, 1e4, -1e4])


def all_criteria():
    out = []
    for name in rp.list_criteria():
        opts = {}
        if name == "renyi":
            for a in (0.0, 0.5, 1.0, 2.0, math.inf):
                for d in ("row", "column"):
                    out.append((name, dict(alpha=a, direction=d)))
            continue
        out.append((name, opts))
    return out


@st.composite
def attention(draw):
    B = draw(st.integers(1, 3))
    H = draw(st.integers(1, 3))
    n = draw(st.integers(1, 8))
    N = n + 1
    base = draw(st.sampled_from(["random", "tied", "special"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    logits = torch.randn(B, H, N, N, generator=g) * 3
    kv = torch.randn(2, B, H, N, 4, generator=g)  # keys and values, for criteria that read them
    if base == "tied":
        logits = torch.full((B, H, N, N), draw(st.floats(-5, 5)))
        kv = torch.full_like(kv, draw(st.floats(-5, 5)))
    elif base == "special":
        count = draw(st.integers(1, 6))
        for _ in range(count):
            idx = tuple(draw(st.integers(0, s - 1)) for s in (B, H, N, N))
            logits[idx] = draw(SPECIAL)
            kv[(draw(st.integers(0, 1)), *idx[:3], draw(st.integers(0, 3)))] = draw(SPECIAL)
    return logits, n, kv


@settings(max_examples=150, deadline=None)
@given(attention(), st.floats(1e-3, 1.0), st.booleans())
def test_every_criterion_keeps_exactly_k_valid_tokens(att, r, fuse):
    logits, n, (keys, values) = att
    B = logits.shape[0]
    x = torch.randn(B, n + 1, 4)
    k = keep_count(n, r)
    finite = all(bool(torch.isfinite(t).all()) for t in (logits, keys, values))
    for name, opts in all_criteria():
        ctx = AttentionContext(logits, n, operands=Operands(key=keys, value=values))
        scores = make_criterion(name, **opts)(ctx)
        assert scores.shape == (B, n)
        if finite:
            assert torch.isfinite(scores).all(), (name, opts)
        out, kept = select_tokens(x, scores, k, cls_attn=ctx.cls_attn, fuse=fuse)
        assert kept.shape == (B, k)
        assert ((kept >= 0) & (kept < n)).all()
        assert (kept.diff(dim=1) > 0).all()  # distinct, in order
        assert out.shape[1] == 1 + k + (1 if fuse and k < n else 0)
        assert torch.equal(out[:, 0], x[:, 0])  # CLS kept as is


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 2), st.floats(1e-3, 1.0), st.sampled_from(["renyi", "evit", "random", "shannon"]))
def test_tiny_model_two_tokens_batch_one(batch, r, criterion):
    m = VisionTransformer(img_size=16, patch_size=8, embed_dim=8, depth=3, num_heads=2, num_classes=3)
    m.eval()
    rp.patch(m, keep_rate=r, criterion=criterion, locations=(0, 1, 2), fuse=True)
    with torch.no_grad():
        out = m(torch.randn(batch, 3, 16, 16))
    assert out.shape == (batch, 3) and torch.isfinite(out).all()
    assert all(rec.kept.shape[1] >= 1 for rec in m.renyiprune.records)
