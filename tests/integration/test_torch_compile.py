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


@pytest.mark.parametrize("criterion", ["renyi", "evit", "random"])
def test_a_compiled_model_does_not_recompile_at_each_forward(criterion):
    """The forward counter (``PruneState.step``) changes at every forward; as an int it was a constant to
    dynamo and recompiled the model at every call until the recompile limit (8), after which it ran eager.
    After the first call no forward may recompile (``error_on_recompile``), and the counter still counts."""
    m = rp.patch(tiny(2), keep_rate=0.5, criterion=criterion, alpha=2.0, locations=(1, 2))
    compiled = torch.compile(m, backend="eager")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            kept = []
            for _ in range(4):
                got = compiled(x)
                kept.append(m.renyiprune.records[0].kept.clone())
        m.renyiprune.step -= 1  # eager at the last compiled forward's step: the same draws for random
        want = m(x)
    assert int(m.renyiprune.step) == 5
    assert_close_normwise(got, want, RTOL)
    if criterion == "random":  # a new draw per forward, as in eager
        assert not all(torch.equal(kept[0], k) for k in kept[1:])


def test_benchmark_room_compiles_every_view():
    """``bench --compile`` times many weight-sharing views whose classes share one forward; past dynamo's
    recompile limit (8) the rest would silently run eagerly. Ten views: all ten compile inside the room
    ``benchmark_configs`` makes (one graph each, no graph break in a Rényi forward)."""
    from torch._dynamo.utils import counters

    from renyiprune.experiments.benchmark import _compile_room
    from renyiprune.experiments.evaluate import pruned_view
    from renyiprune.planning.points import Point

    m = tiny(3)
    keeps = (0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25)
    views = [pruned_view(m, Point.from_spec("renyi", k, 2.0, (1, 2))) for k in keeps]
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), _compile_room(len(views)):
        for v in views:
            torch.compile(v, backend="eager")(x)
    assert counters["stats"]["unique_graphs"] == len(views)
