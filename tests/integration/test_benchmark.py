"""``renyiprune bench`` and the benchmark library on a tiny model (no timing assertions)."""

import json

import pytest
import torch
from tolerances import assert_close_normwise, vit_rtol

from renyiprune.cli import main
from renyiprune.core.attention import Needs
from renyiprune.core.plans import PrunePlan
from renyiprune.core.state import records
from renyiprune.experiments.benchmark import PeakTensorMemory, Timing, paired_ratio, time_interleaved
from renyiprune.experiments.evaluate import pruned_view
from renyiprune.models.model import create_model
from renyiprune.planning.points import Point

TINY = ["--model", "deit_tiny_patch16_224", "--image-size", "48", "--batch-size", "2", "--locations", "1,2"]


def test_bench_json(capsys):
    args = [*TINY, "--keep", "0.7,0.5", "--criterion", "evit,renyi", "--alpha", "1,inf"]
    assert main(["bench", *args, "--reps", "1", "--warmup", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "random" in out["weights"] and out["machine"]["torch"] == torch.__version__
    rows = {r["config"]: r for r in out["results"]}
    assert list(rows)[0] == "unpruned" and len(rows) == 1 + 2 + 4
    assert rows["unpruned"]["speedup"] == 1.0 and rows["unpruned"]["gmacs_ratio"] == 1.0
    r = rows["renyi a=inf r=0.5"]
    assert r["gmacs_ratio"] > 1 and r["peak_mb"] > 0 and r["vs_evit"] > 0
    assert r["efficiency"] == pytest.approx(r["speedup"] / r["gmacs_ratio"])
    assert rows["evit r=0.5"]["vs_evit"] is None


def test_bench_takes_any_registered_criterion_with_fusion(capsys):
    args = [*TINY, "--keep", "0.5", "--criterion", "evit,diverse,evit_renyi", "--alpha", "2,inf", "--fuse"]
    assert main(["bench", *args, "--reps", "1", "--warmup", "0", "--json"]) == 0
    rows = {r["config"] for r in json.loads(capsys.readouterr().out)["results"]}
    assert rows == {"unpruned", "evit r=0.5 +fuse", "diverse r=0.5 +fuse", "evit_renyi a=2 r=0.5 +fuse",
                    "evit_renyi a=inf r=0.5 +fuse"}  # fmt: skip


def test_bench_table_and_progress(capsys):
    assert main(["bench", *TINY, "--keep", "0.5", "--reps", "2", "--warmup", "1", "--dtype", "bfloat16"]) == 0
    cap = capsys.readouterr()
    assert "random" in cap.out and "efficiency" in cap.out and "renyi a=2 r=0.5" in cap.out
    assert "round 2/2" in cap.err
    # unpruned ÷ pruned reads as "1.9x fewer GMACs" (the column was "GMACs ratio", which read backwards)
    lines = cap.out.splitlines()
    header = next(line for line in lines if line.startswith("config"))
    assert "fewer GMACs" in header and "GMACs ratio" not in header
    col = header.index("fewer GMACs") + len("fewer GMACs")  # right-aligned under its header
    rows = [line for line in lines if line.startswith(("unpruned", "renyi"))]
    cells = {line.split()[0]: line[:col].split()[-1] for line in rows}
    assert cells["unpruned"] == "1.00x" and float(cells["renyi"].rstrip("x")) > 1


def test_bench_defaults_to_deit_tiny_as_every_command():
    import argparse

    from renyiprune.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    defaults = {name: p.get_default("model") for name, p in sub.choices.items() if p.get_default("model")}
    assert "bench" in defaults and set(defaults.values()) == {"deit_tiny_patch16_224"}, defaults


@pytest.mark.parametrize(
    "extra", [["--batch-size", "0"], ["--criterion", "bogus"], ["--locations", "20"], ["--device", "cuda:0"]]
)
def test_bench_bad_arguments(extra, capsys):
    if extra[0] == "--device" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    try:
        rc = main(["bench", *TINY, *extra])
    except SystemExit as e:  # argparse rejects --batch-size 0 while parsing
        rc = e.code
    assert rc == 2
    assert "error" in capsys.readouterr().err


def test_peak_tensor_memory_counts_live_storages():
    with torch.inference_mode(), PeakTensorMemory() as t:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 8000 live
        v = b.view(10, 100)  # a view adds nothing
        del a
        c = v + 1  # 8000 live again (a freed)
        del b, v, c
    assert t.peak == 8000 and t.current == 0


def test_time_interleaved_and_paired_ratio():
    calls = []
    models = {n: (lambda x, n=n: calls.append(n) or x) for n in "abc"}
    out = time_interleaved(models, torch.zeros(1), warmup=1, reps=2)
    assert [len(t.seconds) for t in out.values()] == [2, 2, 2]
    assert calls[:3] == ["a", "b", "c"] and calls[3:6] == ["b", "c", "a"]  # rotating start
    assert paired_ratio(Timing("x", [2.0, 4.0]), Timing("y", [1.0, 1.0])) == 3.0


def test_bench_takes_every_eval_method(capsys):
    """ToMe by r and by budget, entropy-aware ToMe, removed=merge, best, a per-stage spec: one run."""
    args = [*TINY, "--keep", "0.7", "--criterion", "evit,tome,best,renyi:2@1+evit@2", "--tome-r", "2",
            "--removed", "merge", "--reps", "1", "--warmup", "0", "--json"]  # fmt: skip
    assert main(["bench", *args]) == 0
    rows = {r["config"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    # --removed applies to every pruning configuration: per-stage specs and best's choice too
    assert {"unpruned", "evit r=0.7 +merge", "tome r=2", "renyi:2@1+evit@2 r=0.7 +merge"} <= set(rows)
    assert all(r["removed"] == "merge" for c, r in rows.items() if c not in ("unpruned", "tome r=2"))
    assert len(rows) == 5  # plus best's choice at keep 0.7
    assert rows["tome r=2"]["keep_rate"] is None and rows["tome r=2"]["pruned_from"] == 0
    assert rows["evit r=0.7 +merge"]["removed"] == "merge" and rows["evit r=0.7 +merge"]["pruned_from"] == 1
    args = [*TINY, "--criterion", "tome,evit", "--budget", "0.6", "--entropy-weight", "0.05", "--alpha",
            "inf", "--reps", "1", "--warmup", "0", "--json"]  # fmt: skip
    assert main(["bench", *args]) == 0
    rows = {r["config"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    tome = rows["tome alpha=inf entropy_weight=0.05 budget=0.6"]  # the label tune-budget's records carry
    assert tome["budget"] == 0.6 and tome["alpha"] == "inf" and tome["gmacs_ratio"] >= 1 / 0.6
    assert rows["evit budget=0.6"]["budget"] == 0.6 and rows["evit budget=0.6"]["keep_rate"] is None
    assert tome["vs_evit"] is not None  # paired with evit at the same budget


def test_forward_memory_per_block():
    """Identical blocks on identical shapes peak identically (block 0 starts with less live: no earlier
    block's input); pruning at block 2 leaves blocks 0-1 as they were (plus the pruning state's index
    tensors, < 1 KB here) and lowers the later blocks' peaks; the whole forward's peak is at least every
    block's."""
    from renyiprune.experiments.benchmark import forward_memory

    torch.manual_seed(0)
    model = create_model("deit_tiny_patch16_224", img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    full = forward_memory(model, x)
    assert len(full.block_peaks) == 12 and len(set(full.block_peaks[1:])) == 1
    pruned = forward_memory(pruned_view(model, Point.from_spec("evit", 0.5, locations=(2, 5))), x)
    assert pruned.peak >= max(pruned.block_peaks) and full.peak >= max(full.block_peaks)
    assert all(0 <= p - f < 1024 for p, f in zip(pruned.block_peaks[:2], full.block_peaks[:2], strict=True))
    assert all(p < 0.95 * full.block_peaks[1] for p in pruned.block_peaks[2:])
    assert pruned.peak_from(3) == max(pruned.block_peaks[3:]) and pruned.peak_from(None) == pruned.peak


@pytest.mark.slow
def test_streamed_top1_identical_to_explicit_on_shared_images(shared_assets):
    """Real DeiT-Tiny weights, float32, keep 0.7: the streamed pruning blocks predict exactly what the
    explicit ones do on the first 300 shared images, for EViT and Rényi alpha = 1, 2, inf
    (``benchmarks/streamed_agreement.py`` runs all 1000; docs/performance.md has its result)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from streamed_agreement import agreement

    stats = agreement(shared_assets / "imagenet-sample-1000",
                      shared_assets / "weights" / "deit_tiny_patch16_224.safetensors", limit=300,
                      progress=False)  # fmt: skip
    for name, got in stats.items():
        assert got["images"] == 300 and got["differ"] == 0, (name, got)
        assert got["top1_streamed"] == got["top1_explicit"] > 60.0, (name, got)


def _first_patches(ctx):
    """A criterion that ranks patches by position: the first ones win (reads nothing of the attention)."""
    return -torch.arange(ctx.num_patches, dtype=torch.float32, device=ctx.device).expand(ctx.batch_size, -1)


_first_patches.needs = Needs()


def test_reference_vit_matches_the_model_and_its_floor_matches_keeping_the_first_patches():
    """benchmarks/reference_vit.py: the A/A reference computes the unpruned model's output, and the floor
    (``tokens``) computes a pruned model's that keeps the first patches at the same blocks (drop)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from reference_vit import ReferenceViT

    torch.manual_seed(0)
    model = create_model("deit_tiny_patch16_224", img_size=64).eval()  # 16 patches
    x = torch.randn(3, 3, 64, 64)
    rtol = vit_rtol(torch.float32, depth=12, dim=192, heads=3, tokens=17)
    plan = PrunePlan.uniform(None, _first_patches, locations=(2, 5), tokens=(9, 4))
    with torch.inference_mode():
        assert_close_normwise(ReferenceViT(model)(x), model(x), rtol)
        pruned = pruned_view(model, Point(plan))
        want = pruned(x)
        assert [r.kept.tolist() for r in records(pruned)] == [[list(range(9))] * 3, [list(range(4))] * 3]
        floor = ReferenceViT(model, {2: 1 + 9, 5: 1 + 4})(x)
        assert_close_normwise(floor, want, rtol)
        assert (floor - model(x)).abs().max() > 1e3 * rtol * want.abs().max()  # pruning changed the output
