"""Files written by main's code before the plan type (tests/fixtures/compat, see its README) still load:
sweep records and policy configs to the same labels and keys, planners to the same plans, a training
run's stored config to the same evaluation labels, and a sweep log resumes."""

import functools
import json
from pathlib import Path

import pytest

from renyiprune.core.plans import UNPRUNED, MergePlan, PrunePlan, plan_from_dict
from renyiprune.experiments.sweep import ResultLog
from renyiprune.models.model import create_model
from renyiprune.planning import policy
from renyiprune.planning.budget import plan_for_budget
from renyiprune.planning.build import PatchArgs, build_plan
from renyiprune.planning.points import Point

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "compat"
CONFIGS = json.loads((FIXTURES / "configs.json").read_text())
# eval listed options in flag order (direction, heads, cls_key; r, entropy_weight, alpha); a plan's label
# lists them sorted, as every recorded label (sweeps, policies, probes) already does
REORDERED = {
    "renyi a=1 direction=column heads=pooled cls_key=exclude r=0.7":
        "renyi a=1 cls_key=exclude direction=column heads=pooled r=0.7",
    "tome r=16 entropy_weight=0.05 alpha=2.0": "tome alpha=2.0 entropy_weight=0.05 r=16",
}  # fmt: skip



def test_fixtures_cover_what_was_recorded():
    sources = {r["source"] for r in CONFIGS}
    assert len(CONFIGS) > 300
    assert any(s.startswith("benchmarks/results/") for s in sources)
    assert any(s.startswith("src/renyiprune/planning/policies/") for s in sources)
    labels = {r["label"] for r in CONFIGS}
    needles = ("unpruned", "renyi a=2 budget r=0.7", "tome alpha=1.0 entropy_weight=0.05 schedule=decreasing "
               "budget=0.5", "headvar@3+evit@6+evit@9 r=0.5 +fuse", "renyi a=1 tokens=100,60,30")
    for needle in needles:
        assert needle in labels


@pytest.mark.parametrize("row", CONFIGS, ids=[f"{i}:{r['label']}" for i, r in enumerate(CONFIGS)])
def test_recorded_configs_load_to_the_same_label_and_round_trip(row):
    point = Point.from_dict(row["config"])
    assert point.label == REORDERED.get(row["label"], row["label"])
    again = Point.from_dict(point.to_dict())
    assert again == point and again.to_dict() == point.to_dict()
    # the record form is the old one up to how a fused/merged fate was spelt
    old, new = dict(row["config"]), point.to_dict()
    old_opts = {k: v for k, v in old.pop("options").items() if k not in ("removed", "fusion")}
    new_opts = {k: v for k, v in new.pop("options").items() if k not in ("removed", "fusion")}
    assert old_opts == new_opts
    # the unpruned model and ToMe were written with whatever keep rate and locations the caller had
    plain = old["criterion"] in (None, "tome")
    keys = ("criterion", "budget") if plain else ("criterion", "alpha", "locations", "budget")
    assert {k: old[k] for k in keys} == {k: new[k] for k in keys}


def test_a_recorded_result_is_written_unchanged_so_cache_and_log_keys_stay():
    """Sweep and probe records (benchmarks/results) are written back byte for byte, but the unpruned
    model: it has one record now (keep rate 1, no locations, as sweeps wrote it); the probe wrote keep
    rate 0.7 at (3, 6, 9), which still loads to the unpruned plan. (Sweep logs re-key what they read,
    so either form resumes; the probe's feature cache is keyed on the code as well, which changed.)"""
    recorded = [r for r in CONFIGS if r["source"].startswith("benchmarks/results/")]
    same = [r for r in recorded if r["config"]["criterion"] is not None]
    assert len(same) > 100
    for r in same:
        assert Point.from_dict(r["config"]).to_dict() == r["config"]
    for r in recorded:
        if r["config"]["criterion"] is None:
            assert Point.from_dict(r["config"]) == Point(UNPRUNED)


def test_a_sweep_log_written_by_main_resumes(tmp_path):
    lines = (FIXTURES / "results.jsonl").read_text().splitlines()
    fp = json.loads(lines[0])["run"]
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    log = ResultLog(tmp_path / "results.jsonl", fp)
    done = log.load()
    points = [Point(UNPRUNED), Point.from_dict(json.loads(lines[1])["config"])]
    assert len(done) == len(lines) == 5
    for p in points:
        assert done[log.key(p)]["label"] == p.label
    adaptive = [json.loads(x) for x in lines if json.loads(x)["config"]["budget"]]
    assert adaptive and Point.from_dict(adaptive[0]["config"]).adaptive
    assert ResultLog(tmp_path / "results.jsonl", {**fp, "part": "other"}).load() == {}


def _plan(d: dict) -> PrunePlan | MergePlan:
    if "merge" in d:
        m = dict(d["merge"], alpha=float(d["merge"]["alpha"]))
        return MergePlan(**{**m, "r": tuple(m["r"]) if isinstance(m["r"], list) else m["r"]})
    return plan_from_dict(d)


PLANS = json.loads((FIXTURES / "plans.json").read_text())


@functools.cache
def _deit_tiny():
    return create_model("deit_tiny_patch16_224")


@pytest.mark.parametrize("row", PLANS, ids=[json.dumps(r["call"]) for r in PLANS])
def test_planners_give_the_plans_main_gave(row):
    call, want = row["call"], _plan(row["plan"])
    if call[0] == "best":
        got = policy.best(call[1], path=policy.POLICY_DIR / f"{call[1]}.json", **call[2])
    else:
        args = PatchArgs.bind(**call[1])
        got = build_plan(args)
        if args.budget is not None:
            got = plan_for_budget(_deit_tiny(), got, args.budget)
    assert got == want


def test_shipped_policies_load_and_their_labels_hold():
    """Every config a shipped policy holds loads to main's label for it (the "label" field the files
    carry was written by earlier versions still: main did not read it either), and its entries to plans."""
    main_labels = {Point.from_dict(r["config"]): r["label"] for r in CONFIGS}  # deduplicated across sources
    checked = 0
    for f in sorted(policy.POLICY_DIR.glob("*.json")):
        p = policy.load_policy(f)
        locs, fuse = p.get("locations", (3, 6, 9)), p.get("fuse", False)
        for k, e in p.get("keep", {}).items():
            for setting in [e["best"], *e.get("by_criterion", {}).values()]:
                assert policy.entry_plan(setting, float(k), locs, fuse).stages[0].keep_rate == float(k)
                if "keep_rate" in setting.get("config", {}):  # fine-grained policies: criterion only
                    point = Point.from_dict(setting["config"])
                    assert point.label == main_labels[point]
                    checked += 1
        for f_, e in p.get("budget", {}).items():
            config = e["best"]["config"]
            assert Point.from_dict(config).label == main_labels[Point.from_dict(config)]
            assert policy.budget_plan(p, float(f_)) == Point.from_dict(config).plan
            checked += 1
    assert checked > 50


def test_a_training_runs_stored_config_gives_the_same_evaluation_labels():
    from renyiprune.training.resume import resume_mismatches
    from renyiprune.training.train import TrainConfig, _eval_configs

    stored = json.loads((FIXTURES / "train_config.json").read_text())
    fields = {k: v for k, v in stored["config"].items() if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**{**fields, "locations": tuple(fields["locations"])})
    points = _eval_configs(cfg)
    assert [p.label for p in points] == stored["eval_labels"]
    assert [Point.from_dict(d) for d in stored["eval_configs"]] == points
    assert resume_mismatches(stored["config"], cfg, 1, 1) == []
