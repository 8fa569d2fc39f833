"""The real DeiT-Tiny weights on the 1000 shared ImageNet images: published accuracy and GMACs."""

import math
import re
from pathlib import Path

import pytest
import torch
from plan_points import point

import renyiprune as rp
from renyiprune.data.images import EvalTransform, make_loader
from renyiprune.experiments.evaluate import evaluate, pruned_view
from renyiprune.planning.flops import count_gmacs


@pytest.fixture(scope="module")
def deit_tiny(shared_assets):
    return rp.create_model(
        "deit_tiny_patch16_224", weights=shared_assets / "weights" / "deit_tiny_patch16_224.safetensors"
    )


def test_gmacs_unpruned_and_pruned(deit_tiny):
    assert 1.25 <= count_gmacs(deit_tiny) <= 1.27
    C, n = 192, 196
    total = 196 * 768 * C + C * 1000
    for i in range(12):
        na = n + 1
        if i in (3, 6, 9):
            n = math.ceil(round(0.7 * n, 6))
        nm = n + 1
        total += 3 * na * C * C + 2 * na * na * C + na * C * C + 8 * nm * C * C
    view = pruned_view(deit_tiny, point("renyi", 0.7, 2.0, (3, 6, 9), False))
    assert count_gmacs(view) == pytest.approx(total / 1e9, rel=0.01)


@pytest.mark.slow
def test_published_accuracy_and_pruning_on_1000_images(deit_tiny, shared_assets):
    torch.set_num_threads(max(1, torch.get_num_threads()))
    loader, samples = make_loader(
        shared_assets / "imagenet-sample-1000", EvalTransform(), batch_size=100, workers=2
    )
    assert len(samples) == 1000
    configs = [
        point(None),
        point("evit", 0.7),
        point("renyi", 0.7, 1.0),
        point("random", 0.7),
    ]
    views = {c.label: pruned_view(deit_tiny, c) for c in configs}
    res = {r.config: r for r in evaluate(views, loader, progress=False)}
    base = res["unpruned"]
    assert base.images == 1000
    # README of the shared assets: top-1 79.6 %, top-5 94.9 % with this transform.
    assert base.top1 == pytest.approx(79.6, abs=0.2)
    assert base.top5 == pytest.approx(94.9, abs=0.2)
    for name, r in res.items():
        print(f"{name}: top1 {r.top1:.1f} top5 {r.top5:.1f} gmacs {r.gmacs:.3f}")
    # Pruning 30 % at three blocks costs a few points, and informed criteria beat random selection.
    for name in ("evit r=0.7", "renyi a=1 r=0.7"):
        assert base.top1 - 8 < res[name].top1 < base.top1
    assert res["evit r=0.7"].top1 > res["random r=0.7"].top1
    # The numbers docs/performance.md reports for these configurations reproduce to the image. One
    # image of slack (0.1 point): another CPU's kernels may order two float32 entropies that tie to the
    # last bit differently (the doc's Shannon row shows one such image), which can change one prediction.
    documented = documented_top1()
    for name, row in (("evit r=0.7", "EViT"), ("renyi a=1 r=0.7", "Rényi α = 1")):
        assert abs(res[name].top1 - documented[row]) <= 0.1 + 1e-9, (name, res[name].top1, documented[row])


def documented_top1() -> dict[str, float]:
    """Top-1 per criterion from the streamed-vs-explicit table of docs/performance.md (1000 images)."""
    doc = Path(__file__).resolve().parents[2] / "docs" / "performance.md"
    rows = re.findall(r"^\| (EViT|Rényi α = [^|]+?) \| 1000 \| \d+ \| ([0-9.]+) % \|", doc.read_text(), re.M)
    table = {name: float(top1) for name, top1 in rows}
    assert {"EViT", "Rényi α = 1"} <= set(table), f"table not found in {doc}: {table}"
    return table
