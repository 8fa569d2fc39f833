"""Policies: the hash split, choosing on calibration only, --alpha auto / --criterion best, patch("best")."""

import json

import pytest
import torch

import renyiprune as rp
from renyiprune.cli import build_parser, main
from renyiprune.cli import eval as eval_cmd
from renyiprune.data import images as data_mod
from renyiprune.data.images import Sample
from renyiprune.experiments.tune import choose, is_calibration, split_samples
from renyiprune.planning.policy import POLICY_DIR, load_policy, policy_entry

POLICY = {
    "model": "deit_tiny_patch16_224",
    "locations": [3, 6, 9],
    "fuse": True,
    "keep": {
        "0.5": {
            "best": {"criterion": "hybrid", "alpha": 2.0, "options": {"lam": 0.75}},
            "by_criterion": {
                "renyi": {"criterion": "renyi", "alpha": "inf", "options": {}},
                "hybrid": {"criterion": "hybrid", "alpha": 2.0, "options": {"lam": 0.75}},
            },
        },
        "0.9": {
            "best": {"criterion": "renyi", "alpha": 1.0, "options": {}},
            "by_criterion": {"renyi": {"criterion": "renyi", "alpha": 1.0, "options": {}}},
        },
    },
}


def test_split_is_deterministic_balanced_and_by_file_name(tmp_path):
    samples = [Sample(tmp_path / f"img_{i:04d}.jpg", i % 10) for i in range(1000)]
    calib, evals = split_samples(samples)
    assert 400 < len(calib) < 600 and len(calib) + len(evals) == 1000
    assert not {s.path for s in calib} & {s.path for s in evals}
    moved = [Sample(tmp_path / "elsewhere" / s.path.name, s.label) for s in samples]
    assert [s.path.name for s in split_samples(moved)[0]] == [s.path.name for s in calib]


def test_policy_entry_nearest_keep_and_per_criterion(tmp_path):
    assert policy_entry(POLICY, 0.45)["criterion"] == "hybrid"
    assert policy_entry(POLICY, 0.8)["criterion"] == "renyi"
    assert policy_entry(POLICY, 0.5, "renyi")["alpha"] == "inf"
    with pytest.raises(ValueError, match="no tuned setting"):
        policy_entry(POLICY, 0.9, "hybrid")


def test_choose_picks_best_calibration_top1_then_fewer_gmacs():
    def rec(crit, top1, gmacs, alpha=1.0):
        c = {"criterion": crit, "alpha": alpha, "options": {}, "keep_rate": 0.5, "locations": [3]}
        return {"config": c, "label": crit, "top1": top1, "gmacs": gmacs}

    out = choose([rec("renyi", 70, 0.6, 2.0), rec("hybrid", 72, 0.61), rec("renyi", 71, 0.6, 3.0),
                  rec("headvar", 72, 0.60)])  # fmt: skip
    assert out["best"]["criterion"] == "headvar"
    assert out["by_criterion"]["renyi"]["alpha"] == 3.0


def test_eval_alpha_auto_best_and_per_stage_configs(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(POLICY))
    parser = build_parser()
    args = parser.parse_args(["eval", "--data", str(tmp_path), "--criterion", "renyi,hybrid,best", "--alpha",
                              "auto", "--keep", "0.5", "--policy", str(path), "--fuse"])  # fmt: skip
    cfgs = eval_cmd.configs_from_args(args)
    assert [(d["criterion"], d["alpha"], d["options"]) for d in (c.to_dict() for c in cfgs)] == [
        ("renyi", "inf", {}),
        ("hybrid", 2.0, {"lam": 0.75}),
    ]  # 'best' is hybrid at 0.5, the same config, listed once
    args = parser.parse_args(["eval", "--data", str(tmp_path), "--criterion", "renyi:2@3,evit@6,evit@9"])
    (cfg,) = eval_cmd.configs_from_args(args)
    stages = cfg.plan.stages
    assert [(s.location, s.criterion, s.options) for s in stages] == [(3, "renyi", {"alpha": 2.0}),
                                                                       (6, "evit", {}), (9, "evit", {})]
    assert cfg.to_dict()["criterion"] == "renyi:2@3+evit@6+evit@9" and stages[0].keep_rate == 0.7


def test_shipped_policy_backs_patch_best():
    policy = load_policy()
    assert (POLICY_DIR / "deit_tiny_patch16_224.json").is_file()
    assert {"0.5", "0.7"} <= set(policy["keep"])
    m = rp.create_model("deit_tiny_patch16_224", img_size=32)
    rp.patch(m, criterion="best", keep_rate=0.7)
    best = policy_entry(policy, 0.7)
    assert m.renyiprune.stages[0].name.startswith(best["criterion"].split("@")[0].split(":")[0])
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_tuning_never_reads_an_evaluation_image(shared_assets, tmp_path, images_read):
    from renyiprune.cli import build_parser, tune
    from renyiprune.cli.images import image_run
    from renyiprune.experiments.tuning import calibrate_alpha

    read = images_read
    w = shared_assets / "weights" / "deit_tiny_patch16_224.safetensors"
    d = shared_assets / "imagenet-sample-1000"
    argv = ["tune-alpha", "--weights", str(w), "--data", str(d), "--keep", "0.5", "--alpha", "2,inf",
            "--criterion", "renyi", "--limit", "12", "--out", str(tmp_path), "--no-progress",
            "--workers", "0"]  # fmt: skip
    args = build_parser().parse_args(argv)
    calib, evals = split_samples(data_mod.list_samples(d)[:12])
    model = rp.create_model("deit_tiny_patch16_224", weights=w)
    chosen = calibrate_alpha(image_run(args, model), tune.tuning_of(args), calib)
    assert read and all(is_calibration(p) for p in read)
    assert sorted(set(read)) == sorted(str(s.path) for s in calib)
    assert chosen[0.5]["best"]["criterion"] == "renyi" and "evit" in chosen[0.5]["reference"]
    # The full command then reports on the evaluation half and writes a policy eval accepts.
    assert main(argv) == 0
    policy = load_policy(tmp_path / "policy.json")
    assert policy["evaluation_images"] == len(evals) and "evaluation_top1" in policy["keep"]["0.5"]["best"]
    # ... with the paired difference to EViT on the same evaluation images.
    entry = policy["keep"]["0.5"]
    pair = entry["best"]["evaluation_vs_evit"]
    delta = entry["best"]["evaluation_top1"] - entry["reference"]["evit"]["evaluation_top1"]
    assert pair["delta"] == pytest.approx(delta) and pair["ci95"][0] <= pair["delta"] <= pair["ci95"][1]
    assert 100 * (pair["a_only"] - pair["b_only"]) / len(evals) == pytest.approx(delta)
