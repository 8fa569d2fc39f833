"""``renyiprune.patch`` on real timm ViTs: the same numbers as timm unpruned and as our own model pruned.

Float32 precision notes (why each comparison is exact or how loose it is):
- Pruned timm vs pruned renyiprune model: both run the same float32 operations in the same order
  (timm's Attention/Block/Mlp and ours call the same torch kernels; the pruning blocks are the same code
  reached through the adapter; LayerScale gains are powers of two, see ``timm_models.build_timm``), so
  outputs, scores and kept indices are compared bit for bit.
- Keep rate 1.0 vs timm's own forward: a pruning block computes softmax(q k^T) v explicitly where timm
  runs fused SDPA; the two round differently (a few units of roundoff u per block, carried on through
  the residual stream), so outputs are compared normwise: |out - ref| <= rel * max|ref|. Measured on a
  2-core AMD EPYC under ATEN_CPU_CAPABILITY=default, avx2 and its best, pruning blocks at 5 of 12
  locations: 10-16 u in float32 (u = 2^-24), 16-24 u in float64 (u = 2^-53). The bounds, 2e-5 (335 u)
  and 1e-12, leave 20x and more; a wrong structure (a missed LayerScale or gate, a post-norm block run
  as pre-norm) changes the output by 1e-3 or more.
"""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from timm_models import DEMO, DEMO_WEIGHTS, MODELS, build_timm, ours_like, structure

import renyiprune as rp
from renyiprune.core.hosts import UnsupportedModelError
from renyiprune.core.selection import keep_count
from renyiprune.data.images import EvalTransform, list_samples, load_image
from renyiprune.models.weights import read_state_dict

F32_REL = 2e-5  # explicit attention vs SDPA, normwise, float32 (module docstring)
F64_REL = 1e-12  # the same in float64


def _close(out: torch.Tensor, ref: torch.Tensor, rel: float) -> bool:
    return bool((out - ref).abs().max() <= rel * ref.abs().max())


_PAIRS: dict[str, tuple] = {}


def _pair(name: str) -> tuple:
    """The timm model and renyiprune's model with its weights, built once per name (tests unpatch them)."""
    if name not in _PAIRS:
        host = build_timm(name)
        _PAIRS[name] = (host, ours_like(name, host))
    return _PAIRS[name]


@pytest.mark.parametrize("name", MODELS)
def test_unpatched_and_keep_one_equal_timm_forward(name, images):
    host, ours = _pair(name)
    with torch.no_grad():
        ref = host(images)
        assert torch.equal(ours(images), ref), "our model with the converted weights is timm's network"
        rp.patch(host, keep_rate=1.0, criterion="renyi", alpha=2.0, locations=(0, 3, 6, 9, 11))
        try:
            out = host(images)
            assert all(r.patch_index.shape[1] == 196 for r in host.renyiprune.records)
            assert _close(out, ref, F32_REL), (out - ref).abs().max()
            host.double()
            x64 = images[:1].double()  # one image: float64 is the slow part of this file
            out64 = host(x64)
            rp.unpatch(host)
            ref64 = host(x64)
            assert _close(out64, ref64, F64_REL), (out64 - ref64).abs().max()
        finally:
            rp.unpatch(host)
            host.float()


CONFIGS = [
    dict(criterion="renyi", alpha=2.0, fuse=False),
    dict(criterion="renyi", alpha=2.0, fuse=True),  # the default fusion rule (EViT's)
    dict(criterion="evit", fuse=False),
    dict(criterion="evit", fuse=True),
    dict(criterion="renyi", alpha=2.0, fuse=True, fusion="renorm"),
]


def _config_id(c: dict) -> str:
    return f"{c['criterion']}-{c.get('fusion', 'fuse') if c['fuse'] else 'drop'}"


@pytest.mark.parametrize("keep", [0.7, 0.5])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_config_id)
@pytest.mark.parametrize("name", MODELS)
def test_pruned_timm_equals_pruned_renyiprune_model(name, cfg, keep, images):
    host, ours = _pair(name)
    try:
        rp.patch(host, keep_rate=keep, **cfg)
        rp.patch(ours, keep_rate=keep, **cfg)
        with torch.no_grad():
            out, ref = host(images), ours(images)
        _assert_same_pruning(host, ours, out, ref, keep)
    finally:
        rp.unpatch(host)
        rp.unpatch(ours)


@pytest.mark.parametrize("kwargs", [
    dict(keep_rate=0.6, criterion="renyi", alpha=2.0, removed="merge"),
    dict(method="tome", r=8),
], ids=["renyi-merge", "tome"])  # fmt: skip
def test_merging_on_timm_equals_renyiprune_model(kwargs, images):
    host, ours = _pair("deit3_small_patch16_224")  # LayerScale in the proportional-attention blocks too
    try:
        rp.patch(host, **kwargs)
        rp.patch(ours, **kwargs)
        with torch.no_grad():
            out, ref = host(images), ours(images)
        assert torch.equal(out, ref), (out - ref).abs().max()
        assert host.renyiprune.locations == ours.renyiprune.locations and len(host.renyiprune.locations) > 0
    finally:
        rp.unpatch(host)
        rp.unpatch(ours)


def _assert_same_pruning(host, ours, out, ref, keep: float) -> None:
    assert torch.equal(out, ref), (out - ref).abs().max()
    recs, want = host.renyiprune.records, ours.renyiprune.records
    assert [r.location for r in recs] == [3, 6, 9] == [r.location for r in want]
    n = 196
    for a, b in zip(recs, want, strict=True):
        assert torch.equal(a.scores, b.scores)
        assert torch.equal(a.kept, b.kept) and torch.equal(a.patch_index, b.patch_index)
        assert a.num_fused == b.num_fused
        # Pruning happened: without fusion at exactly the documented rate (how a fused token is counted
        # at later stages is the fusion rule's business; both models went through the same one).
        if a.num_fused == 0:
            assert a.patch_index.shape == (out.shape[0], keep_count(n, keep))
        assert a.patch_index.shape[1] < n
        n = a.patch_index.shape[1]


def test_real_deit_tiny_weights_on_real_images():
    """The repository's DeiT-Tiny weights load into timm unchanged; on real images timm and our model
    agree unpruned and pruned, and the unpruned model classifies them as DeiT-Tiny does."""
    host = build_timm("deit_tiny_patch16_224")
    host.load_state_dict(read_state_dict(DEMO_WEIGHTS), strict=True)  # same names, no conversion
    ours = rp.create_model("deit_tiny_patch16_224", weights=DEMO_WEIGHTS)
    samples = list_samples(DEMO / "imagenet-100")[::10]  # 10 images, 10 different classes
    tf = EvalTransform()
    x = torch.stack([tf(load_image(s.path)) for s in samples])
    labels = torch.tensor([s.label for s in samples])
    with torch.no_grad():
        ref = host(x)
        assert torch.equal(ours(x), ref)
        assert (ref.argmax(1) == labels).sum() >= 6  # DeiT-Tiny: 72 % top-1 on ImageNet val
        for keep, cfg in [(0.7, CONFIGS[1]), (0.5, CONFIGS[3]), (0.5, CONFIGS[0])]:
            rp.patch(host, keep_rate=keep, **cfg)
            rp.patch(ours, keep_rate=keep, **cfg)
            _assert_same_pruning(host, ours, host(x), ours(x), keep)
        rp.patch(host, keep_rate=1.0, criterion="evit")
        assert _close(host(x), ref, F32_REL)


@pytest.mark.parametrize("name", MODELS)
def test_unpatch_restores_timm_exactly(name, images):
    host, _ = _pair(name)
    before = structure(host)
    with torch.no_grad():
        ref = host(images)
        rp.patch(host, keep_rate=0.5, criterion="renyi", alpha=2.0, fuse=True)
        assert structure(host) != before
        pruned = host(images)
        rp.patch(host, keep_rate=0.7, criterion="evit", locations=(2, 5))  # re-patching: no stacking
        host(images)
        rp.unpatch(host)
        assert structure(host) == before
        assert type(host) is VisionTransformer and type(host).forward is VisionTransformer.forward
        assert not hasattr(host, "renyiprune")
        assert not any(k.startswith("_renyiprune") for m in host.modules() for k in vars(m))
        assert torch.equal(host(images), ref) and not torch.equal(pruned, ref)


def test_forward_features_starts_the_pruning_state(images):
    host, _ = _pair("deit_small_patch16_224")
    try:
        rp.patch(host, keep_rate=0.5, criterion="evit")
        with torch.no_grad():
            full = host(images)
            feats = host.forward_features(images[:1])  # a different batch: the state starts afresh
            assert feats.shape == (1, 1 + keep_count(keep_count(keep_count(196, 0.5), 0.5), 0.5),
                                   host.embed_dim)  # fmt: skip
            assert host.renyiprune.records[0].patch_index.shape[0] == 1
            assert torch.equal(host.forward_head(host.forward_features(images)), full)
        with pytest.raises(UnsupportedModelError, match="forward_intermediates"):
            host.forward_intermediates(images)
    finally:
        rp.unpatch(host)
