"""The shipped Stanford Cars policies are the choices their recorded results make: re-derived here from
the per-configuration calibration-half top-1 in ``benchmarks/results`` (probe sweep, fine-tuned runs),
and loadable by ``--criterion best`` / ``--alpha auto``."""

import json
import sys
from pathlib import Path

import pytest

from renyiprune.core.criteria import list_criteria
from renyiprune.experiments.tune import choose
from renyiprune.planning.policy import load_policy, policy_entry

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "src" / "renyiprune" / "planning" / "policies"
PROBE = POLICIES / "deit_tiny_patch16_224-stanford-cars.json"
FINETUNED = POLICIES / "deit_tiny_patch16_224-stanford-cars-finetuned.json"
RESULTS = REPO / "benchmarks" / "results"


@pytest.mark.parametrize("path", [PROBE, FINETUNED], ids=["probe", "finetuned"])
def test_policy_loads_and_names_registered_criteria(path):
    policy = load_policy(path)
    assert policy["dataset"] == "stanford-cars" and policy["locations"] == [3, 6, 9]
    assert {"0.5", "0.7"} <= set(policy["keep"])
    for k in policy["keep"]:
        best = policy_entry(policy, float(k))
        assert best["criterion"] in list_criteria()
        assert policy_entry(policy, float(k), "renyi")["criterion"] == "renyi"


def test_probe_policy_is_the_calibration_choice_of_the_recorded_sweep():
    records = json.loads((RESULTS / "cars_probe" / "records.json").read_text())["results"]
    policy = load_policy(PROBE)
    for k, entry in policy["keep"].items():
        fused = [r for r in records if r["keep_rate"] == float(k) and r["fuse"] and r["criterion"] != "tome"]
        assert fused, k
        cand = [{"config": r["settings"], "label": r["config"], "top1": r["calibration_top1"],
                 "gmacs": r["gmacs"]} for r in fused]  # fmt: skip
        again = choose(cand)
        assert entry["best"]["label"] == again["best"]["label"]
        assert entry["by_criterion"]["renyi"]["label"] == again["by_criterion"]["renyi"]["label"]
        # the chosen configuration leads the calibration half: no recorded fused configuration beats it
        top = max(r["calibration_top1"] for r in fused)
        assert entry["best"]["calibration_top1"] == pytest.approx(top)


def test_finetuned_policy_is_the_calibration_choice_of_the_recorded_runs():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import cars_finetune

    report = json.loads((RESULTS / "cars_finetune" / "report.json").read_text())
    policy = load_policy(FINETUNED)
    assert policy["keep"] == json.loads(json.dumps(cars_finetune.finetuned_policy_keep(report["runs"])))
    for k, chosen in report["renyi_alpha_chosen"].items():
        assert policy_entry(policy, float(k), "renyi")["label"] == chosen["run"]
        renyi = [r for r in report["runs"] if r["keep"] == float(k) and r["criterion"] == "renyi"]
        assert len(renyi) == 3  # α = 1, 2, ∞ were all fine-tuned
        assert chosen["calibration_top1"] == max(r["calibration_top1"] for r in renyi)
