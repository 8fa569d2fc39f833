"""torch.compile of a patched model gives eager's outputs (tiny model: inductor on 2 CPU cores is slow)."""

import pytest
import torch
from tolerances import assert_close_normwise, vit_rtol

import renyiprune as rp
from renyiprune.models.model import VisionTransformer

pytestmark = [pytest.mark.compile, pytest.mark.numerics]
#: Inductor's generated kernels against eager ones: tiny()'s shape for tests/tolerances.py.
RTOL = vit_rtol(torch.float32, depth=3, dim=16, heads=2, tokens=17)


def tiny(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2, num_classes=5)
    for b in m.blocks:  # peaked attention: the init's near-uniform attention ties the scores to 1e-7
        b.attn.qkv.weight.data.normal_(0, 0.5)
    return m.eval()


def test_inductor_matches_eager_at_three_keep_rates():
    """One inductor compile (the expensive part: a minute or two cold on 2 busy cores), three keep rates."""
    m = rp.patch(tiny(), keep_rate=(0.75, 0.5, 0.25), criterion="renyi", alpha=2.0, locations=(0, 1, 2))
    x = torch.randn(3, 3, 32, 32)
    compiled = torch.compile(m, dynamic=False)
    with torch.no_grad():
        want = m(x)
        kept_eager = [r.patch_index for r in m.renyiprune.records]
        got = compiled(x)
    assert_close_normwise(got, want, RTOL)
    assert [r.patch_index.shape[1] for r in m.renyiprune.records] == [12, 6, 2]
    assert all(torch.equal(a, r.patch_index) for a, r in zip(kept_eager, m.renyiprune.records, strict=True))


@pytest.mark.parametrize(
    "keep,criterion,fuse", [(1.0, "renyi", False), (0.5, "evit", True), (0.1, "renyi", True)]
)
def test_traced_graph_matches_eager(keep, criterion, fuse):
    """Dynamo + AOT autograd (no code generation) across keep rates, criteria and fusion."""
    m = rp.patch(
        tiny(1), keep_rate=keep, criterion=criterion, alpha=float("inf"), locations=(1, 2), fuse=fuse
    )
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(m, backend="aot_eager", dynamic=False)
    with torch.no_grad():
        want = m(x)
        got = compiled(x)
    assert_close_normwise(got, want, RTOL)
