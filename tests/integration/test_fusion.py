"""EViT's token fusion (``fusion="evit"``, the default) and the renormalized variant, each against a
naive per-image reference written from the formula.

EViT (youweiliang/evit, the official code): at a pruning block, after the attention residual, the CLS
query's attention (softmax over all tokens, mean over heads) ranks the N - 1 non-CLS tokens; the top
ceil(r·(N-1)) are kept; the others are summed, each times its raw CLS attention (no renormalization), into
one token appended last. At a later pruning block that token is one of the N - 1: ranked, kept, or
fused again. The renormalized variant (``fusion="renorm"``) divides the weights by their sum and never
ranks the fused token, which always joins the next one.

The references run one image at a time through the blocks, with their own explicit attention and
Python sorting, in float64, so kept indices must match exactly.
"""

import math
from pathlib import Path

import pytest
import torch

import renyiprune as rp
from renyiprune.models.model import VisionTransformer
from renyiprune.planning.budget import VitShape, prune_counts, solve_keep_rate
from renyiprune.planning.flops import count_gmacs
from renyiprune.viz import inspect_attention as ia

WEIGHTS = Path(__file__).resolve().parents[2] / "demo" / "weights" / "deit_tiny_patch16_224.safetensors"
DEMO_IMAGES = Path(__file__).resolve().parents[2] / "demo" / "imagenet-100"


def small_vit():
    torch.manual_seed(0)
    m = VisionTransformer(img_size=64, patch_size=8, embed_dim=48, depth=6, num_heads=3, num_classes=10)
    return m.double().eval()


@pytest.fixture(scope="module")
def deit_tiny():
    if not WEIGHTS.is_file():
        pytest.skip(f"demo weights not found at {WEIGHTS}")
    return rp.create_model("deit_tiny_patch16_224", weights=WEIGHTS).double().eval()


@pytest.fixture(scope="module")
def demo_images():
    """Two real images (preprocessed as DeiT expects): real attention, with its near-ties and peaks."""
    from renyiprune.data.images import EvalTransform, list_samples, load_image

    if not DEMO_IMAGES.is_dir():
        pytest.skip(f"demo images not found at {DEMO_IMAGES}")
    t = EvalTransform(224, 0.875, "bicubic", rp.models.model.IMAGENET_MEAN, rp.models.model.IMAGENET_STD)
    return torch.stack([t(load_image(s.path)) for s in list_samples(DEMO_IMAGES)[:2]]).double()


# ------------------------------------------------------------------------------------------- reference


def _renyi_rows(p, alpha):
    """H_alpha of each row of p (..., N), from the definition."""
    if alpha == 1:
        return -(p * torch.log(p)).sum(-1)
    return torch.log((p**alpha).sum(-1)) / (1 - alpha)


def naive_forward(m, x, keep_rate, locations, fusion, criterion="evit", alpha=2.0):
    """Per image: (logits, kept indices per stage, original patch numbers of the survivors per stage).

    criterion "evit": CLS attention, mean over heads; "renyi": -mean over heads of H_alpha of the token's
    own attention row (the fused token's row included under EViT's rule).
    """
    outs, kept_all, index_all = [], [], []
    for img in x:
        t = torch.cat([m.cls_token[0], m.patch_embed(img[None])[0]], dim=0) + m.pos_embed[0]  # (N, C)
        index = list(range(m.patch_embed.num_patches))  # patch number of each non-CLS token; -1: fused
        carried = False  # renorm: a fused token rides along after the scored patches
        kept_img, index_img = [], []
        for i, blk in enumerate(m.blocks):
            h = blk.norm1(t)
            N, C = h.shape
            H = blk.attn.num_heads
            d = C // H
            qkv = blk.attn.qkv(h).reshape(N, 3, H, d).permute(1, 2, 0, 3)
            q, k, v = qkv[0], qkv[1], qkv[2]
            p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (H, N, N)
            t = t + blk.attn.proj((p @ v).transpose(0, 1).reshape(N, C))
            if i in locations:
                cls = p[:, 0, :].mean(0)  # (N,) raw CLS attention, mean over heads
                n = N - 1 - (1 if carried else 0)  # evit: all N - 1 non-CLS tokens are candidates
                if criterion == "evit":
                    score = [float(cls[1 + j]) for j in range(n)]
                else:
                    ent = _renyi_rows(p, alpha).mean(0)  # (N,)
                    score = [-float(ent[1 + j]) for j in range(n)]
                left = math.ceil(keep_rate * n)  # EViT: math.ceil(keep_rate * (N - 1))
                kept = sorted(sorted(range(n), key=lambda j: -score[j])[:left])
                pruned = [j for j in range(n) if j not in kept]
                rows = [t[0]] + [t[1 + j] for j in kept]
                survivors = [index[j] for j in kept]
                if fusion == "evit":
                    if pruned:  # nothing pruned: nothing fused (EViT returns the tokens unchanged)
                        fused = torch.zeros_like(t[0])
                        for j in pruned:
                            fused = fused + cls[1 + j] * t[1 + j]
                        rows.append(fused)
                        index = survivors + [-1]
                    else:
                        index = survivors
                else:
                    members = [1 + j for j in pruned] + ([N - 1] if carried else [])
                    if members:
                        w = torch.stack([cls[j] for j in members])
                        rows.append(sum(w[c] * t[j] for c, j in enumerate(members)) / w.sum())
                        carried = True
                    index = survivors
                t = torch.stack(rows)
                kept_img.append(kept)
                index_img.append(survivors)
            t = t + blk.mlp(blk.norm2(t))
        outs.append(m.head(m.norm(t)[0]))
        kept_all.append(kept_img)
        index_all.append(index_img)
    return torch.stack(outs), kept_all, index_all


def _check_against_reference(m, x, keep_rate, locations, fusion, criterion="evit", alpha=2.0):
    with torch.no_grad():
        want, want_kept, want_index = naive_forward(m, x, keep_rate, locations, fusion, criterion, alpha)
        rp.patch(m, keep_rate=keep_rate, criterion=criterion, alpha=alpha, locations=locations, fuse=True,
                 **({} if fusion == "evit" else {"fusion": fusion}))  # fmt: skip
        got = m(x)
    records = m.renyiprune.records
    rp.unpatch(m)
    for s, rec in enumerate(records):
        assert rec.kept.tolist() == [want_kept[b][s] for b in range(x.shape[0])], f"stage {s}"
        assert rec.patch_index.tolist() == [want_index[b][s] for b in range(x.shape[0])], f"stage {s}"
    # float64 throughout; the two differ only in summation order (batched matmuls, SDPA in the blocks
    # that do not prune): ~1e-13 relative on logits of size ~1-10, far below 1e-9.
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    return records


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("keep_rate", [0.5, 0.7, 0.9])
@pytest.mark.parametrize("criterion", ["evit", "renyi"])
def test_evit_fusion_matches_naive_reference_small_vit(keep_rate, criterion):
    torch.manual_seed(1)
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    records = _check_against_reference(small_vit(), x, keep_rate, (1, 3, 4), "evit", criterion)
    # from the second location on, the fused token is counted: n = kept + 1
    assert [r.scores.shape[1] for r in records] == [64, records[0].kept.shape[1] + 1,
                                                    records[1].kept.shape[1] + 1]  # fmt: skip


@pytest.mark.parametrize("keep_rate", [0.5, 0.7])
@pytest.mark.parametrize("criterion", ["evit", "renyi"])
def test_renorm_fusion_matches_naive_reference_small_vit(keep_rate, criterion):
    torch.manual_seed(2)
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    records = _check_against_reference(small_vit(), x, keep_rate, (1, 3, 4), "renorm", criterion)
    assert [r.scores.shape[1] for r in records] == [64, records[0].kept.shape[1], records[1].kept.shape[1]]


@pytest.mark.parametrize("fusion", ["evit", "renorm"])
@pytest.mark.parametrize("keep_rate", [0.5, 0.7])
def test_fusion_matches_naive_reference_deit_tiny(deit_tiny, demo_images, fusion, keep_rate):
    """DeiT-Tiny's real weights on two real images, EViT's locations 3, 6, 9 (0-based)."""
    _check_against_reference(deit_tiny, demo_images, keep_rate, (3, 6, 9), fusion)


def test_fused_token_is_kept_and_fused_again_somewhere():
    """The reference tests above mean something only if the fused token's fate varies: over a batch of
    random images at keep 0.5 it is kept by some images (patch_index -1) and re-fused by others."""
    torch.manual_seed(3)
    m = rp.patch(small_vit(), keep_rate=0.5, criterion="evit", locations=(1, 3, 4), fuse=True)
    with torch.no_grad():
        m(torch.randn(16, 3, 64, 64, dtype=torch.float64))
    rec = m.renyiprune.records[1]
    kept_fused = (rec.kept == rec.scores.shape[1] - 1).any(dim=1)  # the last candidate is the fused token
    assert kept_fused.any() and not kept_fused.all()
    assert torch.equal((rec.patch_index == -1).any(dim=1), kept_fused)


def test_default_is_evit_for_fuse_removed_and_the_evit_criterion():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    outs = {}
    with torch.no_grad():
        settings = {"fuse": dict(fuse=True), "removed": dict(removed="fuse"),
                    "evit": dict(fuse=True, fusion="evit"), "renorm": dict(fuse=True, fusion="renorm")}
        for name, kw in settings.items():
            m = rp.patch(small_vit(), keep_rate=0.5, criterion="evit", locations=(1, 3, 4), **kw)
            outs[name] = (m(x), m.renyiprune.fusion, m.renyiprune.describe())
    assert outs["fuse"][1] == outs["removed"][1] == "evit" and outs["renorm"][1] == "renorm"
    assert torch.equal(outs["fuse"][0], outs["evit"][0]) and torch.equal(outs["removed"][0], outs["evit"][0])
    assert not torch.allclose(outs["fuse"][0], outs["renorm"][0])
    assert outs["renorm"][2].endswith("+fuse (renorm)") and outs["fuse"][2].endswith("+fuse")


def test_fusion_option_is_checked():
    with pytest.raises(ValueError, match="fusion must be one of evit, renorm"):
        rp.patch(small_vit(), keep_rate=0.5, fuse=True, fusion="mean")
    with pytest.raises(ValueError, match="fused pruning only"):
        rp.patch(small_vit(), keep_rate=0.5, fusion="renorm")  # nothing is fused
    with pytest.raises(ValueError, match="fused pruning only"):
        rp.patch(small_vit(), keep_rate=0.5, removed="merge", fusion="evit")


@pytest.mark.parametrize("fusion", ["evit", "renorm"])
@pytest.mark.parametrize("keep_rate", [0.9, 0.7, 0.5, 0.25])
def test_counted_gmacs_follow_the_token_counts(fusion, keep_rate):
    """budget.prune_counts (what the budget solver uses) equals the token counts of a forward, and its
    analytic GMACs the FlopCounterMode count of that forward (minus the fusion einsum, ~C MACs/token)."""
    m = rp.create_model("deit_tiny_patch16_224")  # random weights: the counts do not depend on them
    shape = VitShape.of(m)
    counts = prune_counts(shape, (3, 6, 9), [keep_rate] * 3, True, fusion)
    rp.patch(m, keep_rate=keep_rate, criterion="evit", locations=(3, 6, 9), fuse=True, fusion=fusion)
    seen = []
    for blk in m.blocks:
        blk.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].shape[1], out.shape[1])))
    with torch.no_grad():
        m(torch.randn(1, 3, 224, 224))
    assert seen == counts
    assert shape.gmacs(counts) == pytest.approx(count_gmacs(m), rel=2e-3)


def test_evit_counts_by_hand():
    """DeiT-Tiny at keep 0.5, locations 3, 6, 9: 196 -> 98 kept + fused = 99 -> 50 + 1 -> 26 + 1
    (renorm: 98 + 1 -> 49 + 1 -> 25 + 1)."""
    shape = VitShape(embed_dim=192, depth=12, num_patches=196)
    evit = prune_counts(shape, (3, 6, 9), [0.5] * 3, True)
    renorm = prune_counts(shape, (3, 6, 9), [0.5] * 3, True, "renorm")
    assert [nm for _, nm in evit] == [197] * 3 + [100] * 3 + [52] * 3 + [28] * 3
    assert [nm for _, nm in renorm] == [197] * 3 + [100] * 3 + [51] * 3 + [27] * 3
    # the budget solver follows the rule: at the same budget EViT's rule keeps a lower rate
    assert solve_keep_rate(shape, 0.5, (3, 6, 9), fuse=True) <= solve_keep_rate(
        shape, 0.5, (3, 6, 9), fuse=True, fusion="renorm")


def test_budget_patch_meets_the_counted_budget_with_evit_fusion():
    m = rp.create_model("deit_tiny_patch16_224")
    full = count_gmacs(m)
    for budget in (0.65, 0.5):
        rp.patch(m, criterion="evit", budget=budget, fuse=True)
        assert m.renyiprune.fusion == "evit"
        assert count_gmacs(m) <= budget * full * (1 + 1e-9)


def test_masks_skip_a_kept_fused_token():
    """visualize's masks map patch_index to the grid: a kept fused token (-1) marks no patch, and the
    fused token's share is what is not kept, per image."""
    torch.manual_seed(3)
    m = small_vit()
    x = torch.randn(16, 3, 64, 64, dtype=torch.float64)
    spec = ia.MaskSpec("evit", "evit")
    records = ia.prune_records(m, x, spec, 0.5, (1, 3, 4), fuse=True)
    kept, fused = ia.masks_from_records(records, 64, fuse=True)
    assert any((r.patch_index == -1).any() for r in records)  # the case this test is about
    for s, rec in enumerate(records):
        for b in range(16):
            real = {i for i in rec.patch_index[b].tolist() if i >= 0}
            assert set(torch.nonzero(kept[b, s]).flatten().tolist()) == real
            assert int(fused[b, s]) == 64 - len(real)


# ------------------------------------------------------------------- two prefix tokens (HF DeiT)


def _hf_deit():
    """A 4-layer HF DeiT with teacher (CLS + distillation token + 16 patches), float64, distinct prefix."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed (renyiprune[hf])")
    cfg = transformers.DeiTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128, image_size=32,
        patch_size=8, num_labels=5, layer_norm_eps=1e-6, hidden_act="gelu",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.DeiTForImageClassificationWithTeacher(cfg).eval().double()
    with torch.no_grad():  # HF initializes both prefix tokens to zero: make them distinct
        model.deit.embeddings.cls_token.normal_()
        model.deit.embeddings.distillation_token.normal_()
    return model


def naive_hf_deit_evit(model, x, keep_rate, locations):
    """EViT's rule with P = 2 prefix tokens, per image: both prefix tokens kept first and never fused;
    the CLS query (token 0) ranks the N - 2 others, the fused token among them from the second location on."""
    base, P = model.deit, 2
    emb = base.embeddings(x)
    finals, kept_all = [], []
    for b in range(x.shape[0]):
        t, kept_b = emb[b], []
        for i, layer in enumerate(base.layers):
            att = layer.attention
            z = layer.layernorm_before(t)
            H, d = att.num_attention_heads, att.head_dim
            q, k, v = (lin(z).view(-1, H, d).transpose(0, 1) for lin in (att.q_proj, att.k_proj, att.v_proj))
            p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
            t = t + att.o_proj((p @ v).transpose(0, 1).reshape(z.shape[0], H * d))
            if i in locations:
                cls = p[:, 0, :].mean(0)
                n = t.shape[0] - P
                left = math.ceil(keep_rate * n)
                kept = sorted(sorted(range(n), key=lambda j: -float(cls[P + j]))[:left])
                pruned = [j for j in range(n) if j not in kept]
                rows = [t[0], t[1]] + [t[P + j] for j in kept]
                if pruned:
                    rows.append(sum(cls[P + j] * t[P + j] for j in pruned))
                t = torch.stack(rows)
                kept_b.append(kept)
            t = t + layer.mlp(layer.layernorm_after(t))
        finals.append(base.layernorm(t))
        kept_all.append(kept_b)
    h = torch.stack(finals)
    return (model.cls_classifier(h[:, 0]) + model.distillation_classifier(h[:, 1])) / 2, kept_all


@pytest.mark.parametrize("keep_rate", [0.5, 0.7])
def test_evit_fusion_with_two_prefix_tokens_hf_deit(keep_rate):
    model = _hf_deit()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    locs = (1, 2, 3)
    with torch.no_grad():
        want, want_kept = naive_hf_deit_evit(model, x, keep_rate, locs)
        rp.patch(model, keep_rate=keep_rate, criterion="evit", locations=locs, fuse=True)
        got = model(x).logits
    assert model.renyiprune.num_prefix == 2
    for s, rec in enumerate(model.renyiprune.records):
        assert rec.kept.tolist() == [want_kept[b][s] for b in range(3)]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)  # float64; summation order only


# --------------------------------------------------------------------- selecting the rule: CLI, sweeps


def test_eval_cli_fusion_flag(tmp_path):
    from renyiprune.cli import build_parser
    from renyiprune.cli import eval as eval_cmd

    def configs(*extra):
        argv = ["eval", "--data", str(tmp_path), "--criterion", "evit,tome", *extra]
        return eval_cmd.configs_from_args(build_parser().parse_args(argv))

    default, renorm = configs("--fuse"), configs("--fuse", "--fusion", "renorm")
    assert [c.label for c in default] == ["evit r=0.7 +fuse", "tome r=16"]  # EViT's rule: nothing to say
    assert [c.label for c in renorm] == ["evit fusion=renorm r=0.7 +fuse", "tome r=16"]
    assert configs("--fuse", "--fusion", "evit") == default
    removed = configs("--removed", "fuse", "--fusion", "renorm")[0]
    assert (removed.plan.removed, removed.plan.fusion) == ("fuse", "renorm") and removed == renorm[0]
    with pytest.raises(ValueError, match="--fusion applies to fused pruning"):
        configs("--fusion", "renorm")
    assert renorm[0].plan.fusion == "renorm" and default[0].plan.fusion == "evit"


def test_sweep_spec_option_and_records_name_their_rule():
    from renyiprune.experiments.grid import Grid, grid_points
    from renyiprune.planning.points import Point

    evit, renorm = grid_points(Grid(fuse=(True,), keep=(0.5,), alpha=(1.0,)), ["evit", "evit[fusion=renorm]"])
    assert renorm.to_dict()["options"] == {"fusion": "renorm"} and evit.to_dict()["options"] == {}
    assert evit.to_dict()["fusion"] == "evit" and renorm.to_dict()["fusion"] == "renorm"
    unfused = Point.from_spec("evit", 0.5, 1.0, (3, 6, 9), False)
    for c in (evit, renorm, unfused):
        assert Point.from_dict(c.to_dict()) == c
    assert "fusion" not in unfused.to_dict()
    # A record written before the rule had a name (no "fusion" key) was made with the renormalized rule:
    # it is read as such, so that a resumed sweep reruns the EViT-rule config instead of reusing it.
    old = {k: v for k, v in evit.to_dict().items() if k != "fusion"}
    assert Point.from_dict(old) == renorm
