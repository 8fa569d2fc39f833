"""The fast pruning block (probabilities in place, entropy from them) against a straightforward one."""

import math

import pytest
import torch
from tolerances import assert_close_normwise, vit_rtol

import renyiprune as rp
from renyiprune.core.attention import Operands, Site
from renyiprune.core.criteria import AttentionContext, attention_logits
from renyiprune.core.entropy import renyi_entropy
from renyiprune.core.selection import keep_count
from renyiprune.core.streamed import score_block
from renyiprune.experiments.benchmark import PeakTensorMemory
from renyiprune.models.model import VisionTransformer

pytestmark = pytest.mark.numerics

ALPHAS = [1.0, 2.0, math.inf, 0.5, 3.0, 1.2]


#: small_vit()'s shape for the tolerance policy: 6 blocks, width 48, 3 heads, 8 x 8 patches + CLS.
SMALL_VIT = dict(depth=6, dim=48, heads=3, tokens=65)


def small_vit(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    cfg = dict(img_size=64, patch_size=8, embed_dim=48, depth=6, num_heads=3, num_classes=10)
    cfg.update(kw)
    return VisionTransformer(**cfg).to(dtype).eval()


def straightforward_forward(m, x, keep_rate, locations, criterion, alpha, fuse):
    """Whole batch, explicit logits -> softmax -> entropy from the probabilities, topk selection."""
    t = m.patch_embed(x)
    t = torch.cat([m.cls_token.expand(x.shape[0], -1, -1), t], dim=1) + m.pos_embed
    kept_all = []
    for i, blk in enumerate(m.blocks):
        h = blk.norm1(t)
        B, N, C = h.shape
        H = blk.attn.num_heads
        q, k, v = blk.attn.qkv(h).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // H), dim=-1)  # (B, H, N, N)
        t = t + blk.attn.proj((p @ v).transpose(1, 2).reshape(B, N, C))
        if i in locations:
            n = N - 1 - (1 if fuse and kept_all else 0)
            rows = p[:, :, 1 : 1 + n]
            if criterion == "evit":
                score = p[:, :, 0, 1 : 1 + n].mean(1)
            else:
                if alpha == 1:
                    ent = -(rows * torch.log(rows)).sum(-1)
                elif math.isinf(alpha):
                    ent = -torch.log(rows.amax(-1))
                else:
                    ent = torch.log((rows**alpha).sum(-1)) / (1 - alpha)
                score = -ent.mean(1)
            kk = keep_count(n, keep_rate)
            kept = score.topk(kk, dim=1).indices.sort(dim=1).values
            parts = [t[:, :1], t[:, 1:].gather(1, kept[..., None].expand(-1, -1, C))]
            if fuse:
                w = p[:, :, 0, 1:].mean(1).clone()
                w[:, :n].scatter_(1, kept, 0.0)
                parts.append(((w / w.sum(1, keepdim=True))[..., None] * t[:, 1:]).sum(1, keepdim=True))
            t = torch.cat(parts, dim=1)
            kept_all.append(kept)
        t = t + blk.mlp(blk.norm2(t))
    return m.head(m.norm(t)[:, 0]), kept_all


@pytest.mark.parametrize("alpha", [1.0, 2.0, math.inf, 0.5])
@pytest.mark.parametrize("fuse", [False, True])
def test_fast_path_equals_straightforward(alpha, fuse):
    m = small_vit()
    torch.manual_seed(1)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        want, want_kept = straightforward_forward(m, x, 0.6, (1, 3, 4), "renyi", alpha, fuse)
        # the straightforward forward fuses by the renormalized rule (EViT's: integration/test_fusion.py)
        rp.patch(m, keep_rate=0.6, criterion="renyi", alpha=alpha, locations=(1, 3, 4), fuse=fuse,
                 **({"fusion": "renorm"} if fuse else {}))
        got = m(x)
    assert_close_normwise(got, want, vit_rtol(torch.float64, **SMALL_VIT))  # float64, different kernels
    for rec, kept in zip(m.renyiprune.records, want_kept, strict=True):
        assert torch.equal(rec.kept, kept)


def test_evit_fast_path_equals_straightforward():
    m = small_vit()
    torch.manual_seed(2)
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        want, want_kept = straightforward_forward(m, x, 0.5, (0, 2, 5), "evit", 1.0, True)
        rp.patch(m, keep_rate=0.5, criterion="evit", locations=(0, 2, 5), fuse=True, fusion="renorm")
        got = m(x)
    assert_close_normwise(got, want, vit_rtol(torch.float64, **SMALL_VIT))  # float64, different kernels
    assert all(torch.equal(r.kept, k) for r, k in zip(m.renyiprune.records, want_kept, strict=True))


def _qk(dtype, B=2, H=3, N=17, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=dtype) * 2
    k = torch.randn(B, H, N, D, generator=g, dtype=dtype)
    return q, k


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_row_entropy_from_probabilities_matches_log_sum_exp(alpha, dtype, tol):
    q, k = _qk(dtype)
    logits = attention_logits(q, k, 0.5)
    want = renyi_entropy(logits[:, :, 1:15], alpha)
    ctx = AttentionContext(logits.clone(), 14, operands=Operands(q, k, scale=0.5), reuse_logits=True)
    got = ctx.row_entropy(alpha)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    # The logits buffer became the probabilities in place; the output path still gets softmax(logits).
    torch.testing.assert_close(ctx.probs, logits.softmax(-1), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_shannon_from_probabilities(dtype, tol):
    """Shannon from the probabilities (-sum p log p), whether the entropy or another reader (fused softmax
    first) made them: both equal the log-sum-exp reference. float32: a sum of 64 terms of size <= 1/e
    each, rounded at 2^-24 relative, stays far inside 1e-5."""
    q, k = _qk(dtype)
    logits = attention_logits(q, k, 0.5)
    want = renyi_entropy(logits[:, :, 1:15], 1.0)
    ctx = AttentionContext(logits.clone(), 14, operands=Operands(q, k, scale=0.5), reuse_logits=True)
    torch.testing.assert_close(ctx.row_entropy(1.0), want, atol=tol, rtol=tol)
    assert ctx._logits is None  # the logits buffer became the probabilities
    ctx = AttentionContext(logits.clone(), 14, operands=Operands(q, k, scale=0.5), reuse_logits=True)
    assert ctx.probs.shape == logits.shape
    torch.testing.assert_close(ctx.row_entropy(1.0), want, atol=tol, rtol=tol)


def test_logits_stay_readable_after_in_place_softmax():
    q, k = _qk(torch.float32)
    logits = attention_logits(q, k, 0.25)
    ctx = AttentionContext(logits.clone(), 15, operands=Operands(q, k, scale=0.25), reuse_logits=True)
    p = ctx.probs  # in place
    assert torch.equal(ctx.logits, logits)  # recomputed with the same formula
    assert torch.equal(ctx.probs, p)


def test_reading_logits_first_keeps_them_intact():
    q, k = _qk(torch.float32)
    logits = attention_logits(q, k, 0.25)
    ctx = AttentionContext(logits, 15, operands=Operands(q, k, scale=0.25), reuse_logits=True)
    before = ctx.logits.clone()
    assert ctx.probs.shape == logits.shape
    ctx.row_entropy(2.0)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("criterion,alpha", [("evit", 1), ("renyi", 1), ("renyi", 2), ("renyi", math.inf)])
def test_pruning_block_holds_one_attention_matrix(criterion, alpha):
    """Peak tensor memory of a pruning block's explicit attention stays below two B x H x N x N buffers;
    the cost model's chunks (4 B N C floats here, N = 257, C = 12) stay far below one."""
    m = small_vit(torch.float32, img_size=128, patch_size=8, embed_dim=12, num_heads=3)
    rp.patch(m, keep_rate=0.5, criterion=criterion, alpha=alpha, locations=(1,))
    blk = m.blocks[1]
    torch.manual_seed(0)
    x = torch.randn(2, 257, 12)
    nn_bytes = 2 * 3 * 257 * 257 * 4
    crit = m.renyiprune.stages[0].criterion
    with torch.inference_mode(), PeakTensorMemory() as tracker:
        score_block(blk.attn, x, crit, Site(num_patches=256, explicit=True))
    assert nn_bytes <= tracker.peak < 1.5 * nn_bytes
    with torch.inference_mode(), PeakTensorMemory() as tracker:
        score_block(blk.attn, x, crit, Site(num_patches=256))
    assert tracker.peak < nn_bytes / 4


def test_bfloat16_autocast_on_cpu_runs(bf16_attention):
    m = small_vit(torch.float32)
    torch.manual_seed(3)
    x = torch.randn(4, 3, 64, 64)
    rp.patch(m, keep_rate=0.7, criterion="renyi", alpha=2.0, locations=(1, 3))
    with torch.inference_mode():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert [r.kept.shape for r in m.renyiprune.records] == [(4, 45), (4, 32)]
    # Random weights give near-uniform attention (many near-ties), so only the output scale is compared.
    assert (out.float() - ref).abs().max() < 0.4 * ref.abs().max()


@pytest.mark.parametrize("alpha", [1.0, 2.0, math.inf])
def test_bfloat16_entropy_from_in_place_probabilities(alpha):
    q, k = _qk(torch.bfloat16)
    logits = attention_logits(q, k, 0.5)
    want = renyi_entropy(logits[:, :, 1:15], alpha)  # float32 from the bf16 logits
    ctx = AttentionContext(logits.clone(), 14, operands=Operands(q, k, scale=0.5), reuse_logits=True)
    got = ctx.row_entropy(alpha)
    assert got.dtype == torch.float32 and ctx.probs.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=0.03, rtol=0.03)  # bf16 probabilities: 8-bit mantissa


def test_bfloat16_weights_run(bf16_attention):
    m = small_vit(torch.bfloat16)
    rp.patch(m, keep_rate=0.5, criterion="renyi", alpha=1.0, locations=(2,), fuse=True)
    with torch.inference_mode():
        out = m(torch.randn(2, 3, 64, 64, dtype=torch.bfloat16))
    assert torch.isfinite(out.float()).all()


def test_gradients_flow_without_in_place_softmax():
    m = small_vit(torch.float32)
    rp.patch(m, keep_rate=0.5, criterion="renyi", alpha=1.0, locations=(1, 3))
    m(torch.randn(2, 3, 64, 64)).sum().backward()
    assert m.blocks[1].attn.qkv.weight.grad is not None
    assert m.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
