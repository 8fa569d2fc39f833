"""Compute budgets across methods: token-count schedules, sweep --budget, the policy's budget section,
patch(criterion="best", budget=F) and tune-budget's calibration-only choice."""

import json

import pytest
import torch
from plan_points import point
from tolerances import assert_close_normwise, vit_rtol

import renyiprune as rp
from renyiprune.cli import build_parser, main
from renyiprune.core.plans import tome_schedule
from renyiprune.data import images as data_mod
from renyiprune.experiments import tune as tune_mod
from renyiprune.experiments.evaluate import pruned_view
from renyiprune.experiments.grid import Grid, grid_points
from renyiprune.experiments.sweep import build_cache, first_location, run_view
from renyiprune.experiments.tables import markdown_tables
from renyiprune.experiments.tune import is_calibration, split_samples
from renyiprune.models.model import VisionTransformer
from renyiprune.planning import policy as policy_mod
from renyiprune.planning.budget import VitShape, solve_tome_r, tome_counts
from renyiprune.planning.flops import count_gmacs
from renyiprune.planning.points import Point
from renyiprune.planning.policy import budget_plan, load_policy


def small_vit():
    torch.manual_seed(0)
    m = VisionTransformer(img_size=64, patch_size=8, embed_dim=48, depth=6, num_heads=3, num_classes=10)
    return m.eval()


def test_token_counts_per_location_are_kept_exactly():
    m = small_vit()
    x = torch.randn(2, 3, 64, 64)
    rp.patch(m, criterion="evit", locations=(1, 3, 5), tokens=(40, 17, 17))
    with torch.no_grad():
        m(x)
    assert [r.kept.shape[1] for r in m.renyiprune.records] == [40, 17, 17]
    # A count above what is left keeps everything; the same as the equivalent keep rates.
    rp.patch(m, criterion="evit", locations=(1, 3), tokens=(32, 100))
    with torch.no_grad():
        a = m(x)
        assert [r.kept.shape[1] for r in m.renyiprune.records] == [32, 32]
        rp.patch(m, criterion="evit", locations=(1, 3), keep_rate=(0.5, 1.0))
        b = m(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_every_block_schedule_with_merge_and_token_errors():
    m = small_vit()
    counts = [60, 52, 44, 36, 28, 20]
    rp.patch(m, criterion="renyi", alpha=2, locations=range(6), tokens=counts, removed="merge")
    with torch.no_grad():
        out = m(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    assert [r.kept.shape[1] for r in m.renyiprune.records] == [60, 52, 44, 36, 28, 20]
    assert float(m.renyiprune.size.sum()) == 65  # every patch (and CLS) is in exactly one token
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        rp.patch(m, locations=(1,), tokens=0)
    with pytest.raises(ValueError, match="either budget or tokens"):
        rp.patch(m, locations=(1,), tokens=5, budget=0.5)
    with pytest.raises(ValueError, match="2 values for 3"):
        rp.patch(m, locations=(1, 2, 3), tokens=[5, 4])


def test_decreasing_tome_budget_is_the_smallest_r_that_fits():
    shape = VitShape.of(rp.create_model("deit_tiny_patch16_224"))
    full = shape.gmacs(shape.unpruned())
    for f in (0.75, 0.5):
        r = solve_tome_r(shape, f, "decreasing")
        assert shape.gmacs(tome_counts(shape, tome_schedule(r, "decreasing", 12))) <= f * full
        assert shape.gmacs(tome_counts(shape, tome_schedule(r - 1, "decreasing", 12))) > f * full
    m = rp.create_model("deit_tiny_patch16_224")
    rp.patch(m, method="tome", schedule="decreasing", budget=0.5)
    assert m.renyiprune.merge_r[0] > m.renyiprune.merge_r[-1]
    assert count_gmacs(m) <= 0.505 * full


def test_sweep_budgets_build_tome_and_pruning_configs():
    grid = Grid(fuse=(False,), locations=(3, 6, 9), budget=(0.65, 0.5), keep=(0.7,), alpha=(2.0,))
    cfgs = grid_points(grid, ["tome", "tome[entropy_weight=0.05;alpha=inf]", "evit[removed=merge]", "renyi"])
    got = {(d["criterion"], d["alpha"], tuple(d["options"].items())) for d in (c.to_dict() for c in cfgs)}
    assert ("tome", 1.0, (("budget", 0.5),)) in got
    assert ("tome", 1.0, (("alpha", "inf"), ("budget", 0.65), ("entropy_weight", 0.05))) in got
    assert ("evit", 1.0, (("budget", 0.5), ("removed", "merge"))) in got
    assert ("renyi", 2.0, (("budget", 0.65),)) in got and len(cfgs) == 8
    assert first_location(cfgs[0], 12) == 0 and first_location(cfgs[-1], 12) == 3
    records = [{"config": c.to_dict(), "label": c.label, "top1": float(i), "top5": 0.0, "gmacs": 1.0,
                "images": 3} for i, c in enumerate(cfgs)]  # fmt: skip
    table = markdown_tables(records)
    assert "| criterion | budget 0.5 | budget 0.65 |" in table
    assert "| tome | 1.00 / 1.000 | 0.00 / 1.000 |" in table


@pytest.mark.numerics
def test_tome_through_the_sweep_cache_equals_the_model():
    m = small_vit()
    x = torch.randn(5, 3, 64, 64)
    batch = data_mod.Batch(x, torch.zeros(5, dtype=torch.long), torch.arange(5), [])
    cache = build_cache(m, [batch], 0, total=5, progress=False)
    for cfg in (point("tome", options={"r": 6}),
                point("evit", 0.5, locations=(2, 4), options={"removed": "merge"})):  # fmt: skip
        view = pruned_view(m, cfg)
        with torch.no_grad():
            # cached batches of another size: the float32 policy for small_vit()'s shape
            rtol = vit_rtol(torch.float32, depth=6, dim=48, heads=3, tokens=65)
            assert_close_normwise(run_view(view, cache), view(x), rtol)


POLICY = {
    "model": "deit_tiny_patch16_224",
    "budget": {
        "0.5": {"best": {"config": {"criterion": "evit", "keep_rate": 1.0, "alpha": 1.0,
                                    "locations": [3, 6, 9], "fuse": False,
                                    "options": {"budget": 0.5, "removed": "merge"}}}},
        "0.75": {"best": {"config": {"criterion": "tome", "keep_rate": 1.0, "alpha": 1.0, "locations": [],
                                     "fuse": False, "options": {"budget": 0.75, "entropy_weight": 0.05,
                                                                "alpha": "inf", "schedule": "decreasing"}}}},
    },
}  # fmt: skip


def test_patch_best_with_budget_follows_the_policys_method(tmp_path, monkeypatch):
    (tmp_path / "deit_tiny_patch16_224.json").write_text(json.dumps(POLICY))
    monkeypatch.setattr(policy_mod, "POLICY_DIR", tmp_path)
    # the method chosen at the nearest tuned budget, its keep rate still to be solved for 0.55
    assert budget_plan(load_policy(), 0.55) == rp.PrunePlan.uniform(1.0, "evit", (3, 6, 9), removed="merge")
    m = rp.create_model("deit_tiny_patch16_224")
    full = count_gmacs(m)
    rp.patch(m, criterion="best", budget=0.5)
    st = m.renyiprune
    assert st.method == "prune" and st.removed == "merge" and st.stages[0].name == "evit"
    assert 0.49 * full <= count_gmacs(m) <= 0.505 * full
    rp.patch(m, criterion="best", budget=0.8)  # nearest tuned budget: 0.75's method, solved for 0.8
    st = m.renyiprune
    assert st.method == "tome" and st.entropy_weight == 0.05 and st.entropy_alpha == float("inf")
    assert st.merge_r[0] > st.merge_r[-1]  # the decreasing schedule
    assert 0.78 * full <= count_gmacs(m) <= 0.805 * full


def test_tune_budget_chooses_on_calibration_images_only(shared_assets, tmp_path, monkeypatch, images_read):
    read = images_read
    w = shared_assets / "weights" / "deit_tiny_patch16_224.safetensors"
    d = shared_assets / "imagenet-sample-1000"
    calib, evals = split_samples(data_mod.list_samples(d)[:12])
    seen_at_choice = []
    real_choose = tune_mod.choose

    def choose_spy(records):
        seen_at_choice.append(list(read))
        return real_choose(records)

    from renyiprune.experiments import tuning

    monkeypatch.setattr(tuning, "choose", choose_spy)
    argv = ["tune-budget", "--weights", str(w), "--data", str(d), "--budget", "0.5", "--limit", "12",
            "--candidates", "tome[entropy_weight=0.05;alpha=1],evit[removed=merge]", "--out", str(tmp_path),
            "--no-progress", "--workers", "0"]  # fmt: skip
    assert main(argv) == 0
    assert seen_at_choice and all(is_calibration(p) for p in seen_at_choice[0])
    assert sorted(set(seen_at_choice[0])) == sorted(str(s.path) for s in calib)
    assert {str(s.path) for s in evals} <= set(read)  # read afterwards, for the report
    policy = load_policy(tmp_path / "policy.json")
    entry = policy["budget"]["0.5"]
    assert entry["best"]["config"]["options"]["budget"] == 0.5 and "evaluation_top1" in entry["best"]
    assert "evaluation_top1" in entry["reference"]["tome"] and "keep" in policy  # keep section carried over
    pair = entry["best"]["evaluation_vs_tome"]  # paired on the same evaluation images
    delta = entry["best"]["evaluation_top1"] - entry["reference"]["tome"]["evaluation_top1"]
    assert pair["delta"] == pytest.approx(delta) and pair["ci95"][0] <= pair["delta"] <= pair["ci95"][1]
    chosen = budget_plan(load_policy(tmp_path / "policy.json"), 0.5)
    assert chosen is not None and getattr(chosen, "alpha", 1.0) == 1.0
    table = (tmp_path / "results.md").read_text()
    assert "| criterion | budget 0.5 |" in table and "unpruned (reference)" in table
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    args = build_parser().parse_args(argv)
    assert args.budget == [0.5]


def test_eval_tokens_flag_builds_count_schedules(tmp_path):
    from renyiprune.cli import eval as eval_cmd

    parser = build_parser()
    args = parser.parse_args(["eval", "--data", str(tmp_path), "--criterion", "evit", "--tokens", "120,80,50"
                              ])  # fmt: skip
    (cfg,) = eval_cmd.configs_from_args(args)
    assert cfg.to_dict()["options"]["tokens"] == [120, 80, 50] and cfg.label == "evit tokens=120,80,50"
    assert [s.tokens for s in cfg.plan.stages] == [120, 80, 50]
    args = parser.parse_args(["eval", "--data", str(tmp_path), "--criterion", "evit", "--tokens", "1,2"])
    with pytest.raises(ValueError, match="2 counts for 3 locations"):
        eval_cmd.configs_from_args(args)


def test_configs_with_infinite_alpha_options_round_trip_through_json():
    c = point("tome", options={"alpha": float("inf"), "entropy_weight": 0.05}, budget=0.5)
    d = json.loads(json.dumps(c.to_dict(), allow_nan=False))
    assert d["options"]["alpha"] == "inf" and Point.from_dict(d) == c


def test_every_method_stays_within_its_budget_in_counted_gmacs():
    """The solved schedules include merging's similarity products, and a criterion's own products are
    fitted by counting, so the counted GMACs of every method (as FlopCounterMode sees the forward)
    never exceed F x unpruned, and come close to it."""
    m = rp.create_model("deit_tiny_patch16_224")
    full = count_gmacs(m)
    methods = [dict(method="tome"), dict(method="tome", schedule="decreasing"),
               dict(criterion="evit"), dict(criterion="evit", removed="fuse"),
               dict(criterion="evit", removed="merge"),
               # criteria with products of their own, which the solver leaves to the counted check
               dict(criterion="shannon", removed="fuse"),
               dict(criterion="diverse", removed="fuse")]  # fmt: skip
    for kw in methods:
        for f in (0.9, 0.75, 0.65, 0.5):
            g = count_gmacs(rp.patch(m, budget=f, **kw)) / full
            # r steps are coarse (one more merge per block = 12 blocks' worth); 2r -> 0 even more so
            slack = {None: 0.02, "tome": 0.035}[kw.get("method")] if "schedule" not in kw else 0.06
            assert f - slack <= g <= f, (kw, f, g)


def test_eval_best_with_budget_lists_the_policys_method(tmp_path):
    from renyiprune.cli import eval as eval_cmd

    path = tmp_path / "policy.json"
    path.write_text(json.dumps(POLICY))
    args = build_parser().parse_args(["eval", "--data", str(tmp_path), "--criterion", "best", "--budget",
                                      "0.5,0.8", "--policy", str(path)])  # fmt: skip
    a, b = (c.to_dict() for c in eval_cmd.configs_from_args(args))
    assert (a["criterion"], a["options"]) == ("evit", {"budget": 0.5, "removed": "merge"})
    assert b["criterion"] == "tome" and b["options"]["budget"] == 0.8
    assert b["options"]["schedule"] == "decreasing" and b["options"]["alpha"] == "inf"
    a = eval_cmd.configs_from_args(args)[0]
    assert a.label == "evit budget=0.5 +merge"


def test_eval_merge_order_flag_reaches_the_tome_config(tmp_path):
    from renyiprune.cli import eval as eval_cmd

    argv = ["eval", "--data", str(tmp_path), "--criterion", "tome", "--entropy-weight", "0.05",
            "--merge-order", "cls_attention", "--budget", "0.5"]  # fmt: skip
    args = build_parser().parse_args(argv)
    (cfg,) = eval_cmd.configs_from_args(args)
    assert isinstance(cfg.plan, rp.MergePlan) and cfg.plan.merge_order == "cls_attention"
    assert cfg.budget == 0.5
    m = rp.patch(small_vit(), method="tome", r=4, entropy_weight=0.05, merge_order="cls_attention")
    assert "merge_order=cls_attention" in m.renyiprune.describe()
