"""Host adapters without transformers: a timm-shaped ViT (timm cannot be imported here) and clear errors
for models `patch` cannot prune."""

import pytest
import torch
import torch.nn.functional as F
from tolerances import F32_DEIT_TINY, assert_close_normwise, vit_rtol
from torch import nn

import renyiprune as rp
from renyiprune.core.hosts import UnsupportedModelError
from renyiprune.models.model import VisionTransformer

#: timm_like()'s shape (4 blocks, width 32, 2 heads, 16 patches + CLS) for tests/tolerances.py.
RTOL = vit_rtol(torch.float32, depth=4, dim=32, heads=2, tokens=17)


class TimmAttention(nn.Module):
    """timm's Attention layout: fused qkv, q/k norms, fused SDPA inside forward, no qkv_heads."""

    def __init__(self, ours: nn.Module):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = ours.num_heads, ours.head_dim, ours.scale
        self.qkv, self.proj = ours.qkv, ours.proj
        self.q_norm, self.k_norm, self.proj_drop = nn.Identity(), nn.Identity(), nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class LayerScale(nn.Module):
    def __init__(self, dim, value):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), value))

    def forward(self, x):
        return x * self.gamma


class TimmBlock(nn.Module):
    """timm's Block layout (ls1/ls2 LayerScale), sharing the weights of one of our blocks."""

    def __init__(self, ours: nn.Module, gamma: float):
        super().__init__()
        dim = ours.norm1.normalized_shape[0]
        self.norm1, self.attn, self.drop_path1 = ours.norm1, TimmAttention(ours.attn), nn.Identity()
        self.ls1, self.ls2 = LayerScale(dim, gamma), LayerScale(dim, gamma)
        self.norm2, self.mlp, self.drop_path2 = ours.norm2, ours.mlp, nn.Identity()

    def forward(self, x, attn_mask=None):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def timm_like(gamma: float = 1.0):
    torch.manual_seed(0)
    ours = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    host = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    host.load_state_dict(ours.state_dict())
    host.blocks = nn.Sequential(*(TimmBlock(b, gamma) for b in host.blocks))
    return ours.eval(), host.eval()


@pytest.mark.numerics
def test_timm_shaped_model_prunes_like_ours():
    ours, host = timm_like()
    x = torch.randn(2, 3, 32, 32)
    for crit, keep, fuse in [("renyi", 0.5, False), ("evit", 0.7, True)]:
        rp.patch(ours, keep_rate=keep, criterion=crit, alpha=2.0, locations=(1, 2), fuse=fuse)
        rp.patch(host, keep_rate=keep, criterion=crit, alpha=2.0, locations=(1, 2), fuse=fuse)
        with torch.no_grad():
            assert_close_normwise(ours(x), host(x), RTOL)
        for a, b in zip(ours.renyiprune.records, host.renyiprune.records, strict=True):
            assert torch.equal(a.patch_index, b.patch_index)
    rp.unpatch(host)
    assert all(type(b) is TimmBlock for b in host.blocks)


@pytest.mark.numerics
def test_timm_layerscale_is_applied():
    _, host = timm_like(gamma=0.3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = host(x)
        rp.patch(host, keep_rate=1.0, criterion="renyi", locations=(0, 3))
        assert_close_normwise(host(x), ref, RTOL)  # explicit attention against SDPA


@pytest.mark.numerics
def test_real_timm_if_importable():
    timm = pytest.importorskip("timm", reason="timm cannot be imported in this environment")
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = m(x)
        rp.patch(m, keep_rate=1.0, criterion="renyi")
        assert_close_normwise(m(x), ref, F32_DEIT_TINY)  # vit_tiny: DeiT-Tiny's shape
        rp.patch(m, keep_rate=0.5, criterion="renyi", alpha=2.0)
        assert m(x).shape == (1, 10) and m.renyiprune.records[-1].patch_index.shape[1] == 25


class Windowed(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.layer.window_size = 7


@pytest.mark.parametrize("make,needle", [
    (lambda: nn.Linear(4, 4), "no 'blocks'"),
    (Windowed, "windowed attention"),
    (lambda: _without_cls(), "no CLS token"),
    (lambda: _with_blocks(nn.Sequential(nn.Linear(4, 4))), "has no norm1, attn, norm2, mlp"),
])  # fmt: skip
def test_unsupported_models_name_what_is_missing(make, needle):
    with pytest.raises(UnsupportedModelError, match=needle):
        rp.patch(make())


def _without_cls():
    m = VisionTransformer(img_size=16, patch_size=8, embed_dim=8, depth=2, num_heads=2)
    m.cls_token = None
    return m


def _with_blocks(blocks):
    m = VisionTransformer(img_size=16, patch_size=8, embed_dim=8, depth=2, num_heads=2)
    m.blocks = blocks
    return m
