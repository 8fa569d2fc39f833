"""P >= 1 prefix tokens (CLS, then DeiT's distillation token): always kept first, never ranked or merged.

Hugging Face DeiT (two prefix tokens) is checked against a per-image reference written here from the HF
modules' weights; the core pieces (criteria, selection, merging, budget counts) with P = 2 and 3 against
plain loops.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close_normwise, vit_rtol
from torch import nn

import renyiprune as rp
from renyiprune.core.attention import Operands
from renyiprune.core.criteria import CRITERIA, AttentionContext, attention_logits
from renyiprune.core.entropy import renyi_entropy
from renyiprune.core.hosts import UnsupportedModelError, check_token_layout
from renyiprune.core.merging import bipartite_matching, merge_into_kept
from renyiprune.core.selection import select_tokens
from renyiprune.models.model import VisionTransformer
from renyiprune.planning.budget import VitShape, prune_counts, tome_counts

transformers = pytest.importorskip("transformers", reason="transformers is not installed (renyiprune[hf])")

pytestmark = pytest.mark.numerics

LOCS = (1, 2)
#: tiny_deit()'s shape for the tolerance policy: 4 blocks, width 32, 2 heads, 16 patches + 2 prefix tokens.
TINY_DEIT = dict(depth=4, dim=32, heads=2, tokens=18)


def tiny_deit(cls=None, seed: int = 0):
    """A 4-layer HF DeiT (CLS + distillation token + 16 patches), float64, eval mode."""
    cfg = transformers.DeiTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128, image_size=32,
        patch_size=8, num_labels=5, layer_norm_eps=1e-6, hidden_act="gelu",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = (cls or transformers.DeiTForImageClassificationWithTeacher)(cfg).eval().double()
    with torch.no_grad():  # HF initializes both prefix tokens to zero: make them distinct
        emb = model.deit.embeddings if hasattr(model, "deit") else model.embeddings
        emb.cls_token.normal_()
        emb.distillation_token.normal_()
    return model


def pixels(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)


def _base(model):
    return model.deit if hasattr(model, "deit") else model


def _out(model, out):
    """Logits of a classifier; the last hidden state of a DeiTModel."""
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# --------------------------------------------------------------------------------------------- reference


def _attention(layer, z, bias):
    """Explicit attention of one image z (N, C) with an additive key bias (N,): (output, probs, keys)."""
    att = layer.attention
    H, d = att.num_attention_heads, att.head_dim

    def heads(lin):
        return lin(z).view(z.shape[0], H, d).transpose(0, 1)  # (H, N, d)

    q, k, v = heads(att.q_proj), heads(att.k_proj), heads(att.v_proj)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)  # (H, N, N)
    out = (p @ v).transpose(0, 1).reshape(z.shape[0], H * d)
    return att.o_proj(out), p, k


def reference(model, x, keep, locations, removed="drop"):
    """Per image, with explicit q/k/v: EViT pruning (CLS attention, mean over heads) keeping both prefix
    tokens first, then the top-k patches in their original order; ``removed`` fuse / merge as described in
    EViT / the package docs. Returns (model output, patch numbers kept at each location per image)."""
    base = _base(model)
    P = 2
    emb = base.embeddings(x)
    finals, kept_all = [], []
    for b in range(x.shape[0]):
        t, size = emb[b], torch.ones(emb.shape[1], dtype=x.dtype)
        index, fused, merged, kept_b = list(range(emb.shape[1] - P)), False, False, []
        for i, layer in enumerate(base.layers):
            bias = size.log() if merged else torch.zeros_like(size)
            y, p, k = _attention(layer, layer.layernorm_before(t), bias)
            t = t + y
            if i in locations:
                cls_row = p[:, 0, :].mean(0)  # (N,) CLS query, mean over heads
                n = len(index)
                scores = cls_row[P : P + n]
                kk = math.ceil(round(keep * n, 6))
                top = sorted(torch.topk(scores, kk).indices.tolist())
                pruned = [j for j in range(n) if j not in top]
                new = [t[0], t[1]] + [t[P + j] for j in top]
                if removed == "fuse" and (pruned or fused):
                    members = [P + j for j in pruned] + ([P + n] if fused else [])
                    w = cls_row[members]
                    new.append(sum(w[m] * t[members[m]] for m in range(len(members))) / w.sum())
                    fused = True
                if removed == "merge":
                    metric = k.mean(0)  # (N, d): keys averaged over heads
                    unit = metric / metric.norm(dim=-1, keepdim=True)
                    groups = {j: [j] for j in top}
                    for j in pruned:
                        sims = [float(unit[P + j] @ unit[P + c]) for c in top]
                        groups[top[max(range(len(top)), key=lambda c: sims[c])]].append(j)
                    new = [t[0], t[1]]
                    sizes = [size[0], size[1]]
                    for c in top:
                        s = sum(size[P + j] for j in groups[c])
                        new.append(sum(size[P + j] * t[P + j] for j in groups[c]) / s)
                        sizes.append(s)
                    size = torch.stack(sizes)
                    merged = True
                t = torch.stack(new)
                if not merged:
                    size = torch.ones(t.shape[0], dtype=x.dtype)
                index = [index[j] for j in top]
                kept_b.append(index)
            t = t + layer.mlp(layer.layernorm_after(t))
        finals.append(base.layernorm(t))
        kept_all.append(kept_b)
    h = torch.stack(finals)
    if isinstance(model, transformers.DeiTForImageClassificationWithTeacher):
        out = (model.cls_classifier(h[:, 0]) + model.distillation_classifier(h[:, 1])) / 2
    elif isinstance(model, transformers.DeiTForImageClassification):
        out = model.classifier(h[:, 0])
    else:
        out = h
    return out, kept_all


CLASSES = ["DeiTForImageClassificationWithTeacher", "DeiTForImageClassification", "DeiTModel"]


@pytest.mark.parametrize("cls", CLASSES)
def test_keep_everything_equals_unpatched(cls):
    model = tiny_deit(getattr(transformers, cls))
    x = pixels()
    with torch.no_grad():
        ref = _out(model, model(x))
        for crit in ("evit", "renyi"):
            rp.patch(model, keep_rate=1.0, criterion=crit, locations=LOCS)
            assert model.renyiprune.num_prefix == 2
            got = _out(model, model(pixel_values=x))
            assert_close_normwise(got, ref, vit_rtol(torch.float64, **TINY_DEIT))  # float64, other kernels
    rp.unpatch(model)
    assert type(model) is getattr(transformers, cls)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("removed", ["drop", "fuse", "merge"])
def test_pruned_deit_matches_per_image_reference(cls, removed):
    model = tiny_deit(getattr(transformers, cls))
    x = pixels()
    with torch.no_grad():
        want, kept = reference(model, x, 0.5, LOCS, removed)
        # the reference fuses by the renormalized rule (EViT's, 2 prefix tokens: test_fusion.py)
        rp.patch(model, keep_rate=0.5, criterion="evit", locations=LOCS, removed=removed,
                 **({"fusion": "renorm"} if removed == "fuse" else {}))
        got = _out(model, model(x))
    extra = 1 if removed == "fuse" else 0
    if cls == "DeiTModel":
        assert got.shape == (3, 2 + 4 + extra, 32)
    assert_close_normwise(got, want, vit_rtol(torch.float64, **TINY_DEIT))  # float64, per-image loops
    for s, rec in enumerate(model.renyiprune.records):
        assert rec.patch_index.tolist() == [kept[b][s] for b in range(3)]
        assert rec.scores.shape == (3, 16 if s == 0 else 8)
        assert rec.num_fused == extra


def test_fuse_and_merge_leave_prefix_tokens_untouched():
    """At the first pruning layer attention sees every token and the MLP is per token, so the prefix
    tokens leaving that layer equal the unpruned model's; the fused token is last, merge sizes stay 1."""
    model = tiny_deit()
    x = pixels()
    seen = []
    hook = model.deit.layers[LOCS[0]].register_forward_hook(
        lambda m, i, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        model(x)
        ref = seen.pop()
        for removed, tokens in [("fuse", 2 + 8 + 1), ("merge", 2 + 8)]:
            rp.patch(model, keep_rate=0.5, criterion="renyi", alpha=2.0, locations=LOCS, removed=removed)
            out = model(x).logits
            got = seen.pop()
            assert out.shape == (3, 5) and torch.isfinite(out).all()
            assert got.shape == (3, tokens, 32)
            assert (got[:, :2] - ref[:, :2]).abs().max() <= 1e-12
            if removed == "merge":
                size = model.renyiprune.size
                assert size.shape == (3, 2 + 4, 1)
                assert torch.equal(size[:, :2], torch.ones(3, 2, 1, dtype=size.dtype))
                assert float(size[:, 2:].sum()) == 3 * 16  # every patch ended up in a kept one
    hook.remove()


def test_tome_never_merges_the_prefix_tokens():
    model = tiny_deit()
    x = pixels()
    seen = []
    hook = model.deit.layers[0].register_forward_hook(
        lambda m, i, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        model(x)
        ref = seen.pop()
        for weight in (0.0, 1.0):
            rp.patch(model, method="tome", r=2, entropy_weight=weight)
            out = model(x).logits
            assert out.shape == (3, 5) and torch.isfinite(out).all()
            size = model.renyiprune.size
            assert size.shape == (3, 18 - 4 * 2, 1)
            assert torch.equal(size[:, :2], torch.ones(3, 2, 1, dtype=size.dtype))
            assert float(size.sum()) == 3 * 18
            first = seen.pop()  # layer 0 attends to every token unbiased: prefix rows as unpruned, in front
            assert first.shape == (3, 16, 32) and (first[:, :2] - ref[:, :2]).abs().max() <= 1e-12
    hook.remove()


def test_budget_is_still_refused_and_unpatch_restores_classes():
    model = tiny_deit()
    with pytest.raises(UnsupportedModelError, match="budget"):
        rp.patch(model, budget=0.6)
    rp.patch(model, keep_rate=0.5, criterion="evit", locations=LOCS)
    rp.unpatch(model)
    assert type(model) is transformers.DeiTForImageClassificationWithTeacher
    assert all(type(layer).__name__ == "DeiTLayer" for layer in model.deit.layers)


# --------------------------------------------------------------------------------------------- core pieces


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0, 3.0, math.inf])
@pytest.mark.parametrize("fused", [0, 1])
def test_renyi_scores_only_the_patches(alpha, fused):
    torch.manual_seed(7)
    B, H, P, n, d = 2, 3, 2, 9, 4
    N = P + n + fused
    q, k = torch.randn(B, H, N, d, dtype=torch.float64), torch.randn(B, H, N, d, dtype=torch.float64)
    logits = attention_logits(q, k, 0.5)
    want = torch.empty(B, n, dtype=torch.float64)
    for b in range(B):
        for i in range(n):
            want[b, i] = -torch.stack([renyi_entropy(logits[b, h, P + i], alpha) for h in range(H)]).mean()
    plain = AttentionContext(logits.clone(), n, num_prefix=P)
    ops = Operands(q, k, scale=0.5)
    fast = AttentionContext(logits.clone(), n, operands=ops, reuse_logits=True, num_prefix=P)
    for ctx in (plain, fast):
        got = CRITERIA["renyi"](ctx, alpha=alpha)
        assert got.shape == (B, n)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_other_criteria_skip_every_prefix_token():
    torch.manual_seed(3)
    B, H, P, n = 2, 2, 2, 7
    N = P + n
    logits = torch.randn(B, H, N, N, dtype=torch.float64) * 2
    probs = logits.softmax(-1)
    ctx = AttentionContext(logits, n, num_prefix=P)
    torch.testing.assert_close(CRITERIA["evit"](ctx), probs[:, :, 0, P:].mean(1))  # float64 stays float64
    # column entropy: key j's column over all queries, for the patch keys P..N-1
    log_p = logits.log_softmax(-1)
    col = -renyi_entropy(log_p[..., P:], 2.0, dim=-2).mean(1)
    torch.testing.assert_close(CRITERIA["renyi"](ctx, alpha=2.0, direction="column"), col)
    # cls_key="exclude" drops the CLS key only; rows of the patches P..N-1 over keys 1..N-1
    rows = -renyi_entropy(logits[:, :, P:, 1:], 2.0).mean(1)
    torch.testing.assert_close(CRITERIA["renyi"](ctx, alpha=2.0, cls_key="exclude"), rows)
    col_ex = -renyi_entropy(logits[..., 1:].log_softmax(-1)[..., P - 1 :], 2.0, dim=-2).mean(1)
    got = CRITERIA["renyi"](ctx, alpha=2.0, direction="column", cls_key="exclude")
    torch.testing.assert_close(got, col_ex)
    for name in ("headvar", "column_norm", "random", "hybrid"):
        assert CRITERIA[name](ctx).shape == (B, n)


@pytest.mark.parametrize("P", [1, 2, 3])
def test_select_tokens_keeps_prefix_first_and_fuses_last(P):
    torch.manual_seed(P)
    B, n, C, k = 2, 8, 5, 3
    for fused in (0, 1):
        x = torch.randn(B, P + n + fused, C, dtype=torch.float64)
        scores = torch.randn(B, n, dtype=torch.float64)
        cls_attn = torch.rand(B, P + n + fused, dtype=torch.float64)
        out, kept = select_tokens(x, scores, k, cls_attn=cls_attn, fuse=True, num_prefix=P, fusion="renorm")
        assert out.shape == (B, P + k + 1, C)
        for b in range(B):
            top = sorted(scores[b].topk(k).indices.tolist())
            assert kept[b].tolist() == top
            torch.testing.assert_close(out[b, :P], x[b, :P])
            torch.testing.assert_close(out[b, P : P + k], x[b, [P + j for j in top]])
            rest = [P + j for j in range(n) if j not in top] + ([P + n] if fused else [])
            w = cls_attn[b, rest]
            torch.testing.assert_close(out[b, -1], (w[:, None] * x[b, rest]).sum(0) / w.sum())
    with pytest.raises(ValueError, match="2 prefix"):
        select_tokens(torch.randn(1, 2 + 8 + 2, 4), torch.randn(1, 8), 3, num_prefix=2)


def _reference_tome(x, size, metric, r, P):
    """ToMe for one image with P protected prefix tokens, with loops; prefix tokens first in the output."""
    N = x.shape[0]
    A, Bs = list(range(0, N, 2)), list(range(1, N, 2))
    targets = [j for j in Bs if j >= P]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    best = {}
    for i in A:
        if i >= P:
            sims = [float(unit[i] @ unit[j]) for j in targets]
            t = max(range(len(targets)), key=lambda c: sims[c])
            best[i] = (sims[t], targets[t])
    r = min(r, len(best), len(targets))
    merged = sorted(best, key=lambda i: -best[i][0])[:r]
    groups = {j: [j] for j in Bs}
    for i in merged:
        groups[best[i][1]].append(i)
    order = list(range(P)) + [i for i in A if i >= P and i not in merged] + [j for j in Bs if j >= P]
    out, sizes = [], []
    for i in order:
        g = groups.get(i, [i])
        s = sum(size[t] for t in g)
        out.append(sum(x[t] * size[t] for t in g) / s)
        sizes.append(s)
    return torch.stack(out), torch.stack(sizes)


@pytest.mark.parametrize("N,r,P", [(12, 3, 2), (11, 3, 2), (13, 4, 3), (18, 2, 2), (6, 10, 2), (9, 2, 4)])
def test_bipartite_matching_protects_every_prefix_token(N, r, P):
    torch.manual_seed(N * 10 + P)
    B, C = 3, 6
    x = torch.randn(B, N, C, dtype=torch.float64)
    size = torch.randint(1, 4, (B, N, 1)).double()
    metric = torch.randn(B, N, 5, dtype=torch.float64)
    got, got_size = bipartite_matching(metric, r, num_prefix=P).merge(x, size)
    for b in range(B):
        want, want_size = _reference_tome(x[b], size[b], metric[b], r, P)
        torch.testing.assert_close(got[b], want)
        torch.testing.assert_close(got_size[b], want_size)
        torch.testing.assert_close(got[b, :P], x[b, :P])
    assert got.shape[1] == N - min(r, (N - P) // 2)


def test_merge_into_kept_with_two_prefix_tokens():
    torch.manual_seed(0)
    B, P, n, C = 2, 2, 9, 4
    x = torch.randn(B, P + n, C, dtype=torch.float64)
    size = torch.randint(1, 3, (B, P + n, 1)).double()
    metric = torch.randn(B, P + n, 3, dtype=torch.float64)
    kept = torch.tensor([[0, 3, 4, 8], [1, 2, 5, 6]])
    out, out_size = merge_into_kept(x, size, metric, kept, n, num_prefix=P)
    assert out.shape == (B, P + 4, C)
    torch.testing.assert_close(out[:, :P], x[:, :P])
    torch.testing.assert_close(out_size[:, :P], size[:, :P])
    for b in range(B):
        unit = F.normalize(metric[b, P:], dim=-1)
        top = kept[b].tolist()
        for c, j in enumerate(top):
            group = [j] + [i for i in range(n) if i not in top and int((unit[i] @ unit[top].T).argmax()) == c]
            s = size[b, [P + i for i in group]]
            torch.testing.assert_close(out_size[b, P + c], s.sum(0))
            torch.testing.assert_close(out[b, P + c], (s * x[b, [P + i for i in group]]).sum(0) / s.sum())


def test_budget_counts_include_every_prefix_token():
    one, two = VitShape(8, 4, 16), VitShape(8, 4, 16, num_prefix=2)
    assert two.unpruned() == [(18, 18)] * 4
    renorm = dict(fuse=True, fusion="renorm")
    assert prune_counts(two, (1, 2), (0.5, 0.5), **renorm) == [(18, 18), (18, 11), (11, 7), (7, 7)]
    assert prune_counts(one, (1, 2), (0.5, 0.5), **renorm) == [(17, 17), (17, 10), (10, 6), (6, 6)]
    # EViT's rule: the fused token is one of the 9 candidates at the second location, ceil(4.5) = 5 kept
    assert prune_counts(two, (1, 2), (0.5, 0.5), fuse=True) == [(18, 18), (18, 11), (11, 8), (8, 8)]
    assert tome_counts(two, [2, 2, 2, 2]) == [(18, 16), (16, 14), (14, 12), (12, 10)]
    assert tome_counts(two, [20] * 4)[0] == (18, 10)  # at most half of the 16 patches merge


# --------------------------------------------------------------------------------------------- refusals


def test_refusals_stay_clear():
    m = VisionTransformer(img_size=16, patch_size=8, embed_dim=8, depth=2, num_heads=2)
    m.cls_token = None
    with pytest.raises(UnsupportedModelError, match="no CLS token"):
        rp.patch(m)
    m = VisionTransformer(img_size=16, patch_size=8, embed_dim=8, depth=2, num_heads=2)
    m.num_prefix_tokens = 0
    with pytest.raises(UnsupportedModelError, match="num_prefix_tokens is 0"):
        rp.patch(m)
    m.num_prefix_tokens = 2
    with pytest.raises(UnsupportedModelError, match="2 prefix tokens"):
        check_token_layout(m, max_prefix=1)
    deit = tiny_deit()
    deit.deit.embeddings.cls_token = None
    with pytest.raises(UnsupportedModelError, match="no CLS token"):
        rp.patch(deit)


class _TimmAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)


def test_timm_with_register_tokens_is_refused_clearly():
    m = VisionTransformer(img_size=16, patch_size=8, embed_dim=8, depth=2, num_heads=2)
    for b in m.blocks:
        b.attn = _TimmAttention()
    m.num_prefix_tokens = 5  # CLS + 4 register tokens
    with pytest.raises(UnsupportedModelError, match="5 prefix tokens.*single CLS token"):
        rp.patch(m)
