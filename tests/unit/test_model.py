"""create_model: weight formats, strict errors, other image sizes, new heads."""

import pytest
import torch
from safetensors.torch import load_file

import renyiprune as rp
from renyiprune.models.weights import WeightsError


@pytest.fixture(scope="module")
def st_path(shared_assets):
    return shared_assets / "weights" / "deit_tiny_patch16_224.safetensors"


@pytest.fixture(scope="module")
def reference(st_path):
    m = rp.create_model("deit_tiny_patch16_224", weights=st_path)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        return x, m(x)


def test_official_pth_and_plain_state_dict(st_path, tmp_path, reference):
    x, ref = reference
    sd = load_file(str(st_path))
    torch.save({"model": sd}, tmp_path / "official.pth")
    torch.save(sd, tmp_path / "plain.pth")
    for w in (tmp_path / "official.pth", tmp_path / "plain.pth", sd):
        m = rp.create_model("deit_tiny_patch16_224", weights=w)
        with torch.no_grad():
            assert torch.equal(m(x), ref)


def test_timm_parameter_names(st_path):
    names = set(load_file(str(st_path)))
    assert names == set(rp.create_model("deit_tiny_patch16_224").state_dict())


def test_wrong_shapes_and_truncated_file(st_path, tmp_path):
    with pytest.raises(WeightsError, match=r"mis-shaped.*blocks\.0\.attn\.qkv\.weight"):
        rp.create_model("deit_small_patch16_224", weights=st_path)
    sd = load_file(str(st_path))
    del sd["norm.bias"]
    sd["extra.weight"] = torch.zeros(3)
    with pytest.raises(WeightsError) as e:
        rp.create_model("deit_tiny_patch16_224", weights=sd)
    assert "norm.bias" in str(e.value) and "extra.weight" in str(e.value)
    data = st_path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        rp.create_model("deit_tiny_patch16_224", weights=tmp_path / "cut.safetensors")


def test_384_interpolates_position_embedding(st_path):
    m = rp.create_model("deit_tiny_patch16_224", weights=st_path, img_size=384)
    assert m.pos_embed.shape == (1, 577, 192)
    rp.patch(m, keep_rate=0.5)
    with torch.no_grad():
        out = m(torch.randn(1, 3, 384, 384))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    assert m.renyiprune.records[0].kept.shape == (1, 288)


def test_new_head(st_path):
    m = rp.create_model("deit_tiny_patch16_224", weights=st_path, num_classes=10)
    assert m.head.weight.shape == (10, 192)
    five_classes = dict(load_file(str(st_path)), **{"head.weight": torch.zeros(5, 192),
                                                     "head.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match="num_classes"):
        rp.create_model("deit_tiny_patch16_224", weights=five_classes)


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model"):
        rp.create_model("resnet50")
