"""Which timm ViTs ``renyiprune.patch`` takes: register/distillation tokens and ViTs whose blocks compute
something else are refused with a clear error (and left untouched); timm options the adapter reproduces
(gated attention, dynamic image size) give timm's own numbers at keep rate 1.0.

The keep-1.0 comparisons run in float64, where explicit attention and timm's fused SDPA agree to ~1e-15
relative; 1e-12 leaves room for 12 blocks and still fails on any structural difference (a missed gate
changes the output by ~10 %).
"""

from __future__ import annotations

import pytest
import torch
from timm.layers.attention import Attention
from timm_models import build_timm, structure

import renyiprune as rp
from renyiprune.core.hosts import UnsupportedModelError

F64_REL = 1e-12


def _keep_one_matches_timm(host, x: torch.Tensor) -> None:
    """Patched at every block with keep rate 1.0, ``host`` computes what timm computes (float64)."""
    host.double()
    x = x.double()
    with torch.no_grad():
        ref = host(x)
        rp.patch(host, keep_rate=1.0, criterion="renyi", alpha=2.0, locations=range(len(host.blocks)))
        out = host(x)
    rp.unpatch(host)
    assert (out - ref).abs().max() <= F64_REL * ref.abs().max(), (out - ref).abs().max()


@pytest.mark.parametrize("name,kwargs,needle", [
    ("vit_small_patch14_reg4_dinov2", dict(img_size=56), "5 prefix tokens .*single CLS token"),
    ("deit_tiny_distilled_patch16_224", dict(img_size=32), "VisionTransformerDistilled"),
    # post-norm blocks (x + norm1(attn(x))), here given a CLS token: pruning would run them pre-norm
    ("vit_base_patch16_rpn_224", dict(img_size=32, class_token=True, global_pool="token"), "ResPostBlock"),
    ("eva02_tiny_patch14_224", dict(img_size=28), "Eva"),  # rotary position embeddings in every block
    ("beit_base_patch16_224", dict(img_size=32), "Beit"),  # relative position bias in the attention
    ("vit_small_patch16_18x2_224", dict(img_size=32), "ParallelThingsBlock|no norm1"),
])  # fmt: skip
def test_unsupported_timm_vits_are_refused_and_left_untouched(name, kwargs, needle):
    host = build_timm(name, **kwargs)
    before = structure(host)
    with pytest.raises(UnsupportedModelError, match=needle):
        rp.patch(host, keep_rate=0.7, criterion="renyi", alpha=2.0)
    assert structure(host) == before and not hasattr(host, "renyiprune")


def test_register_token_error_names_the_tokens():
    host = build_timm("vit_small_patch14_reg4_dinov2", img_size=56)
    assert host.num_prefix_tokens == 5 and host.reg_token.shape[1] == 4
    with pytest.raises(UnsupportedModelError) as err:
        rp.patch(host)
    assert "register tokens" in str(err.value) and "VisionTransformer" in str(err.value)


class GatedAttention(Attention):
    """timm's Attention with its output gate switched on (sigmoid(W_g x) times the heads' output)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, gated=True, **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(attn_layer=GatedAttention),
    dict(qk_norm=True),
    dict(scale_attn_norm=True),
    dict(init_values=0.5, global_pool="avg", fc_norm=True),
], ids=["gated", "qk-norm", "scale-norm", "layerscale-avgpool"])  # fmt: skip
def test_timm_attention_options_match_timm(kwargs):
    host = build_timm("vit_small_patch16_224", img_size=64, **kwargs)
    for b in host.blocks:  # random norms, so that a skipped q/k/scale norm would show
        for m in b.modules():
            if isinstance(m, torch.nn.LayerNorm):
                torch.nn.init.normal_(m.weight, 1.0, 0.5)
    _keep_one_matches_timm(host, torch.randn(2, 3, 64, 64))


def test_dynamic_image_size_prunes_the_input_grid():
    host = build_timm("vit_small_patch16_224", img_size=64, dynamic_img_size=True)
    x = torch.randn(2, 3, 96, 80)  # 6 x 5 patches instead of the configured 4 x 4
    _keep_one_matches_timm(host, x)
    host.float()
    rp.patch(host, keep_rate=0.5, criterion="evit", locations=(1,))
    with torch.no_grad():
        out = host(x.float())
    assert out.shape == (2, 1000)
    index = host.renyiprune.records[0].patch_index
    assert index.shape == (2, 15) and int(index.max()) < 30


def test_patch_dropout_in_training_is_refused():
    host = build_timm("vit_small_patch16_224", img_size=64, patch_drop_rate=0.25)
    rp.patch(host, keep_rate=0.5)
    with torch.no_grad():
        host(torch.randn(1, 3, 64, 64))  # eval mode: patch dropout is off, pruning works
    host.train()
    with pytest.raises(UnsupportedModelError, match="patch dropout"):
        host(torch.randn(1, 3, 64, 64))
