"""sweep: the cached-prefix forward equals the full forward; resumable jsonl; tables, plots and the CLI."""

import json

import pytest
import torch
from plan_points import point
from tolerances import assert_close_normwise, vit_rtol

from renyiprune.data.images import Batch
from renyiprune.experiments import sweep as sw
from renyiprune.experiments.evaluate import pruned_view
from renyiprune.experiments.tables import markdown_tables, to_csv
from renyiprune.models.model import VisionTransformer
from renyiprune.planning.points import Point


def small_vit():
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, embed_dim=24, depth=6, num_heads=3, num_classes=7)
    return VisionTransformer(**cfg).eval()


def batches(n=10, bs=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 7, (n,), generator=g)
    return [Batch(x[i : i + bs], y[i : i + bs], torch.arange(i, min(i + bs, n)), []) for i in range(0, n, bs)]


QUIET = sw.SweepSettings(progress=False)
CONFIGS = [
    point(None, 1.0, 1.0, (), False),
    point("evit", 0.5, 1.0, (1, 3), True),
    point("renyi", 0.7, 2.0, (2, 4), False),
    point("random", 0.6, 1.0, (1, 2, 4), True),
    point("hybrid", 0.5, float("inf"), (1, 3), True, (("lam", 0.3),)),
    point("headvar@1+renyi:3@3", 0.5, 1.0, (), True),
    point("column_norm", 0.7, 1.0, (0, 3), False),
]


@pytest.mark.numerics
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
def test_cached_prefix_equals_full_forward(config):
    model = small_vit()
    start = sw.first_location(config, len(model.blocks))
    cache = sw.build_cache(model, batches(), min(start, 1) if start else 0, total=10, progress=False)
    ref_view, view = pruned_view(model, config), pruned_view(model, config)
    with torch.no_grad():
        ref = torch.cat([ref_view(b.images) for b in batches()])
    out = sw.run_view(view, cache, batch_size=4)
    # Other batch sizes go through other GEMM blockings: the float32 policy for small_vit()'s shape.
    assert_close_normwise(out, ref, vit_rtol(torch.float32, depth=6, dim=24, heads=3, tokens=17))
    assert torch.equal(cache.labels, torch.cat([b.labels for b in batches()]))


class Interrupted(Exception):
    """Stands for a kill in the middle of a configuration."""


def test_sweep_is_resumable_and_loses_only_the_config_in_flight(tmp_path, monkeypatch):
    model = small_vit()
    grid = [(c, r, f) for c in ("evit", "renyi") for r in (0.5, 0.7) for f in (False, True)]
    configs = [point(c, r, 2.0, (1, 3), f) for c, r, f in grid]
    log = sw.ResultLog(tmp_path / "results.jsonl", {"run": "test"})
    real = sw.run_config
    calls, fail_at = [], [3]

    def flaky(model, config, cache, **kw):
        calls.append(config)
        if len(calls) == fail_at[0]:
            fail_at[0] = 0  # only the first run is killed
            raise Interrupted
        return real(model, config, cache, **kw)

    monkeypatch.setattr(sw, "run_config", flaky)
    with pytest.raises(Interrupted):
        sw.run_sweep(model, configs, batches, total=10, log=log, settings=QUIET)
    assert len(log.load()) == 2
    with open(log.path, "a") as f:  # a line torn by a kill is ignored
        f.write('{"label": "torn')
    calls.clear()
    records, timing = sw.run_sweep(model, configs, batches, total=10, log=log, settings=QUIET)
    assert len(calls) == len(configs) - 2 and timing["ran"] == len(configs) - 2
    assert [r["label"] for r in records] == [c.label for c in configs]
    lines = [json.loads(x) for x in log.path.read_text().splitlines() if x.startswith('{"config')]
    assert len(lines) == len(configs)
    calls.clear()

    def no_images():
        raise AssertionError("nothing left to do: images must not be read")

    again, timing = sw.run_sweep(model, configs, no_images, total=10, log=log, settings=QUIET)
    assert not calls and timing["ran"] == 0 and again == records
    # Another fingerprint (other data) does not reuse these results.
    assert sw.ResultLog(log.path, {"run": "other"}).load() == {}


def test_config_round_trip():
    c = point("hybrid", 0.5, float("inf"), (3, 6, 9), True, (("lam", 0.25),), adaptive=True)
    assert Point.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_budget_mode_keeps_on_average_the_rate():
    model = small_vit()
    cache = sw.build_cache(model, batches(n=24), 1, total=24, progress=False)
    cfg = point("renyi", 0.5, 2.0, (1, 3), True, adaptive=True)
    rec = sw.run_config(model, cfg, cache, batch_size=8, progress=False)
    assert abs(rec["details"]["mean_keep_rate"] - 0.5) < 0.2
    fixed = sw.run_config(model, point("renyi", 0.5, 2.0, (1, 3), True), cache, progress=False)
    assert 0.5 * fixed["gmacs"] < rec["gmacs"] < 2 * fixed["gmacs"]


def _records():
    model = small_vit()
    configs = [point(None, 1.0, 1.0, (), False)] + [
        point(c, r, 2.0, (1, 3), True) for c in ("evit", "renyi") for r in (0.5, 0.7)
    ]
    return sw.run_sweep(model, configs, batches, total=10, settings=QUIET)[0]


def test_tables_and_plot(tmp_path):
    records = _records()
    csv = to_csv(records)
    assert csv.splitlines()[0].startswith("label,criterion,alpha,keep_rate") and len(csv.splitlines()) == 6
    md = markdown_tables(records)
    assert "| criterion | keep 0.5 | keep 0.7 |" in md and "unpruned (reference)" in md
    assert "renyi α=2" in md and md.count("**") >= 4  # best per column in bold
    from renyiprune.experiments.pareto import pareto_plot

    paths = pareto_plot(records, tmp_path / "pareto")
    assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.stat().st_size > 1000 for p in paths)


def test_cli_sweep_on_real_images(shared_assets, tmp_path, capsys):
    from renyiprune.cli import main

    w = shared_assets / "weights" / "deit_tiny_patch16_224.safetensors"
    d = shared_assets / "imagenet-sample-1000"
    args = ["sweep", "--weights", str(w), "--data", str(d), "--criterion", "evit,renyi", "--alpha", "2",
            "--keep", "0.7", "--fuse", "off,on", "--limit", "6", "--out", str(tmp_path), "--no-progress",
            "--workers", "0"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "5 configurations (5 run now, 0 resumed)" in out
    for f in ("results.jsonl", "results.csv", "results.md", "pareto.png", "pareto.svg", "timing.json"):
        assert (tmp_path / f).is_file()
    assert main(args) == 0
    assert "(0 run now, 5 resumed)" in capsys.readouterr().out


def test_criterion_tokens_with_alpha_options_and_stages():
    from renyiprune.experiments.grid import Grid, grid_points
    from renyiprune.planning.specs import parse_options

    assert parse_options("base=headvar;norm=4;robust=true;lam=0.5") == {
        "base": "headvar", "norm": 4, "robust": True, "lam": 0.5,
    }  # fmt: skip
    grid = Grid(fuse=(True,), alpha=(1.0, 2.0), lambdas=(0.5, 0.9), keep=(0.7,), locations=(3,))
    points = grid_points(grid, ["renyi:inf", "hybrid[base=headvar]", "headvar@3+evit@6", "renyi"])
    assert [(s.criterion, s.options) for p in points for s in p.plan.stages] == [
        ("renyi", {"alpha": float("inf")}),
        ("hybrid", {"base": "headvar", "lam": 0.5, "alpha": 1.0}),
        ("hybrid", {"base": "headvar", "lam": 0.9, "alpha": 1.0}),
        ("headvar", {}),
        ("evit", {}),
        ("renyi", {"alpha": 1.0}),
        ("renyi", {"alpha": 2.0}),
    ]


@pytest.mark.parametrize("budget", [False, True])
def test_records_carry_per_image_outcomes_and_cross_entropy(budget):
    """'correct' and 'nll' agree with the pruned model's own logits, image by image (budget mode too)."""
    model = small_vit()
    cfg = point("evit", 0.5, 1.0, (1, 3), True, adaptive=budget)
    cache = sw.build_cache(model, batches(), 1, total=10, progress=False)
    rec = sw.run_config(model, cfg, cache, batch_size=4, progress=False)
    assert len(rec["correct"]) == 10 and rec["correct"].count("1") == round(rec["top1"] / 10)
    if budget:
        return  # per-image keep rates: no single view to compare with
    view = pruned_view(model, cfg.plan)
    with torch.no_grad():
        logits = torch.cat([view(b.images) for b in batches()]).double()
    labels = torch.cat([b.labels for b in batches()])
    expect = "".join("1" if c else "0" for c in (logits.argmax(1) == labels).tolist())
    assert rec["correct"] == expect
    nll = sum(float(torch.logsumexp(row, 0) - row[y]) for row, y in zip(logits, labels, strict=True)) / 10
    assert rec["nll"] == pytest.approx(nll, rel=1e-5)
    assert ",nll," in to_csv([rec]).splitlines()[0]


def test_a_bad_config_fails_before_any_config_runs(tmp_path):
    model = small_vit()
    log = sw.ResultLog(tmp_path / "results.jsonl", {"run": "t"})
    # a bad criterion option fails where the plan is made; a budget no keep rate meets, before decoding
    with pytest.raises(ValueError, match="beta"):
        point("diverse", 0.5, 1.0, (1, 3), True, (("beta", -1),))
    configs = [point(None, 1.0, 1.0, (), False), point("evit", 0.5, 1.0, (1, 3), budget=0.01)]
    calls = []

    def make_batches():
        calls.append(1)
        return batches()

    with pytest.raises(ValueError, match="budget"):
        sw.run_sweep(model, configs, make_batches, total=10, log=log, settings=QUIET)
    assert not calls and not (tmp_path / "results.jsonl").exists()
