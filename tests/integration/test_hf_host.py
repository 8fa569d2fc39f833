"""Hugging Face transformers ViT: `renyiprune convert` both ways, and `renyiprune.patch` on HF models."""

import pytest
import torch
from tolerances import F32_DEIT_TINY, assert_close_normwise, vit_rtol

import renyiprune as rp
from renyiprune.cli import main
from renyiprune.core.hosts import UnsupportedModelError
from renyiprune.data.images import EvalTransform, list_samples, load_image
from renyiprune.models.hf import load_into_hf
from renyiprune.models.model import VisionTransformer
from renyiprune.models.weights import read_state_dict

transformers = pytest.importorskip("transformers", reason="transformers is not installed (renyiprune[hf])")

# Hugging Face's attention and ours are different kernels: outputs agree to the float32 policy.
pytestmark = pytest.mark.numerics

#: The 4-block, width-32, 2-head models below (16 patches + CLS), for the tolerance policy.
TINY = dict(depth=4, dim=32, heads=2, tokens=17)


@pytest.fixture(scope="module")
def weights(shared_assets):
    return shared_assets / "weights" / "deit_tiny_patch16_224.safetensors"


@pytest.fixture(scope="module")
def hf_dir(weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "deit-tiny"
    assert main(["convert", str(weights), str(out), "--to", "hf"]) == 0
    return out


@pytest.fixture(scope="module")
def images(shared_assets):
    samples = list_samples(shared_assets / "imagenet-sample-1000")[:2]
    t = EvalTransform(224, 0.875, "bicubic", rp.models.model.IMAGENET_MEAN, rp.models.model.IMAGENET_STD)
    return torch.stack([t(load_image(s.path)) for s in samples])


def tiny_hf(**kw):
    """A 4-layer HF ViT shaped like VisionTransformer(32 px, patch 8, dim 32, 2 heads, 5 classes)."""
    cfg = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128, image_size=32,
        patch_size=8, num_labels=5, layer_norm_eps=1e-6, hidden_act="gelu", **kw,
    )  # fmt: skip
    return transformers.ViTForImageClassification(cfg).eval()


def test_convert_writes_hub_names_and_round_trips(hf_dir, weights, tmp_path):
    assert (hf_dir / "config.json").is_file()
    hub = read_state_dict(hf_dir / "model.safetensors")
    assert "vit.encoder.layer.0.attention.attention.query.weight" in hub  # the Hub's (4.x) names
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(hf_dir), str(back), "--to", "renyiprune"]) == 0
    ours, again = read_state_dict(weights), read_state_dict(back)
    assert set(ours) == set(again) and all(torch.equal(ours[k], again[k]) for k in ours)


def test_hf_model_equals_ours_unpruned_and_pruned(hf_dir, weights, images):
    ours = rp.create_model("deit_tiny_patch16_224", weights=weights)
    model = transformers.ViTForImageClassification.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        assert_close_normwise(model(pixel_values=images).logits, ours(images), F32_DEIT_TINY)
        for crit, alpha in [("renyi", 2.0), ("evit", 1.0)]:
            rp.patch(ours, keep_rate=0.7, criterion=crit, alpha=alpha)
            rp.patch(model, keep_rate=0.7, criterion=crit, alpha=alpha)
            a, b = ours(images), model(images).logits
            assert_close_normwise(a, b, F32_DEIT_TINY)
            assert torch.equal(a.argmax(1), b.argmax(1))
            for r1, r2 in zip(ours.renyiprune.records, model.renyiprune.records, strict=True):
                assert torch.equal(r1.patch_index, r2.patch_index) and torch.equal(r1.kept, r2.kept)
    rp.unpatch(model)
    assert type(model) is transformers.ViTForImageClassification
    assert all(type(layer).__name__ == "ViTLayer" for layer in model.vit.layers)


def test_load_into_instance_and_base_model():
    ours = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    base = transformers.ViTModel(tiny_hf().config, add_pooling_layer=False).eval()
    load_into_hf(base, ours.state_dict())
    x = torch.randn(2, 3, 32, 32)
    got = []
    ours.norm.register_forward_hook(lambda m, i, out: got.append(out))
    for keep, fuse in [(1.0, False), (0.5, True)]:
        rp.patch(ours, keep_rate=keep, criterion="renyi", alpha=1.0, locations=(1, 2), fuse=fuse)
        rp.patch(base, keep_rate=keep, criterion="renyi", alpha=1.0, locations=(1, 2), fuse=fuse)
        with torch.no_grad():
            feats = base(pixel_values=x).last_hidden_state
            ours(x)
        assert feats.shape == got[-1].shape  # CLS + kept (+ fused token)
        assert_close_normwise(feats, got[-1], vit_rtol(torch.float32, **TINY))


def test_tiny_model_fuse_per_stage_and_repatch():
    m = tiny_hf()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x).logits
        rp.patch(m, keep_rate=1.0, criterion="evit", locations=(1, 2))
        assert_close_normwise(m(x).logits, ref, vit_rtol(torch.float32, **TINY))  # keep all = unpruned
        rp.patch(m, keep_rate=(0.5, 0.5), criterion=["renyi", "evit"], alpha=[2.0, 1.0], locations=(1, 2),
                 fuse=True)  # fmt: skip
        out = m(x).logits
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    # EViT's fusion (the default): 16 -> 8 kept + the fused token = 9 candidates -> ceil(4.5) = 5 kept
    assert [r.patch_index.shape[1] for r in m.renyiprune.records] == [8, 5]


def test_distillation_token_is_kept_and_windowed_models_are_refused_clearly():
    cfg = transformers.DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, image_size=32, patch_size=8)  # fmt: skip
    deit = rp.patch(transformers.DeiTForImageClassification(cfg).eval(), keep_rate=0.5, locations=(1,))
    assert deit.renyiprune.num_prefix == 2  # CLS + distillation token (integration/test_prefix_tokens.py)
    with torch.no_grad():
        assert deit(torch.randn(1, 3, 32, 32)).logits.shape == (1, 2)
    swin = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1], num_heads=[2],
                                   window_size=4)  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="windowed attention"):
        rp.patch(transformers.SwinForImageClassification(swin))
    mim = transformers.ViTForMaskedImageModeling(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, encoder_stride=8))  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="reshapes every patch token back into the image grid"):
        rp.patch(mim, keep_rate=0.5, locations=(1,))
    assert type(mim).__name__ == "ViTForMaskedImageModeling"  # refused before anything was re-classed


def test_bad_hf_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = str(tmp_path / "x.safetensors")
    assert main(["convert", str(tmp_path / "empty"), out, "--to", "renyiprune"]) == 2
    assert "no Hugging Face weights" in capsys.readouterr().err


MERGING = [dict(removed="merge", keep_rate=0.5, locations=(1,)), dict(method="tome", r=2)]


@pytest.mark.parametrize("kw", MERGING)
def test_merging_methods_match_ours(kw):
    """Prune-then-merge (proportional attention in later layers) and ToMe run on HF layers like on ours."""
    ours = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    model = tiny_hf()
    load_into_hf(model, ours.state_dict())
    rp.patch(ours.eval(), **kw)
    rp.patch(model, **kw)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close_normwise(model(x).logits, ours(x), vit_rtol(torch.float32, **TINY))
    with pytest.raises(UnsupportedModelError, match="budget"):
        rp.patch(model, budget=0.6)
