"""The shipped Stanford Cars and Oxford Flowers-102 policies are the choices their recorded results make:
re-derived here from the per-configuration calibration-half top-1 in ``benchmarks/results`` (probe
sweep, fine-tuned runs), and loadable by ``--criterion best`` / ``--alpha auto``."""

import json
import sys
from pathlib import Path

import pytest

from renyiprune.core.criteria import list_criteria
from renyiprune.experiments.tune import choose
from renyiprune.planning.policy import load_policy, policy_entry

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "src" / "renyiprune" / "planning" / "policies"
RESULTS = REPO / "benchmarks" / "results"
#: data set -> (probe policy, its sweep's records), (fine-tuned policy, its runs' report, the grid script)
SHIPPED = {
    "stanford-cars": (("deit_tiny_patch16_224-stanford-cars.json", "cars_probe"),
                      ("deit_tiny_patch16_224-stanford-cars-finetuned.json", "cars_finetune")),
    "flowers102": (("deit_tiny_patch16_224-flowers102.json", "flowers_probe"),
                   ("deit_tiny_patch16_224-flowers102-finetuned.json", "flowers_finetune")),
}  # fmt: skip
CASES = [(d, kind) for d in SHIPPED for kind in ("probe", "finetuned")]


def _policy(dataset: str, kind: str) -> Path:
    return POLICIES / SHIPPED[dataset][kind == "finetuned"][0]


@pytest.mark.parametrize("dataset,kind", CASES)
def test_policy_loads_and_names_registered_criteria(dataset, kind):
    policy = load_policy(_policy(dataset, kind))
    assert policy["dataset"] == dataset and policy["locations"] == [3, 6, 9]
    assert {"0.5", "0.7"} <= set(policy["keep"])
    for k in policy["keep"]:
        best = policy_entry(policy, float(k))
        assert best["criterion"] in list_criteria()
        assert policy_entry(policy, float(k), "renyi")["criterion"] == "renyi"


@pytest.mark.parametrize("dataset", list(SHIPPED))
def test_probe_policy_is_the_calibration_choice_of_the_recorded_sweep(dataset):
    records = json.loads((RESULTS / SHIPPED[dataset][0][1] / "records.json").read_text())["results"]
    policy = load_policy(_policy(dataset, "probe"))
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


@pytest.mark.parametrize("dataset", list(SHIPPED))
def test_finetuned_policy_is_the_calibration_choice_of_the_recorded_runs(dataset):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import cars_finetune

    report = json.loads((RESULTS / SHIPPED[dataset][1][1] / "report.json").read_text())
    policy = load_policy(_policy(dataset, "finetuned"))
    assert policy["keep"] == json.loads(json.dumps(cars_finetune.finetuned_policy_keep(report["runs"])))
    for k, chosen in report["renyi_alpha_chosen"].items():
        assert policy_entry(policy, float(k), "renyi")["label"] == chosen["run"]
        renyi = [r for r in report["runs"] if r["keep"] == float(k) and r["criterion"] == "renyi"]
        assert len(renyi) == 3  # α = 1, 2, ∞ were all fine-tuned
        assert chosen["calibration_top1"] == max(r["calibration_top1"] for r in renyi)


@pytest.mark.parametrize("dataset,kind", CASES)
def test_eval_criterion_best_reads_the_policy(dataset, kind, capsys):
    """`eval --criterion best --policy FILE` prunes with each keep rate's choice of the shipped file."""
    from renyiprune.cli import main

    path = _policy(dataset, kind)
    argv = ["eval", "--weights", str(REPO / "demo" / "weights" / "deit_tiny_patch16_224.safetensors"),
            "--data", str(REPO / "demo" / "imagenet-100"), "--limit", "2", "--criterion", "best",
            "--policy", str(path), "--keep", "0.7,0.5", "--fuse", "--json", "--no-progress",
            "--threads", "1", "--workers", "0", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    policy = load_policy(path)
    for r, keep in zip(results, (0.7, 0.5), strict=True):
        entry = policy_entry(policy, keep)
        assert r["config"].startswith(entry["criterion"] + " ") and f"r={keep:g}" in r["config"]
