"""Fine-tuning on real Stanford Cars images with the demo DeiT-Tiny: the probe head, ``eval --weights``
on a run's weights, and benchmarks/cars_finetune.py (resume, skip, report). Three classes' images."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from plan_points import point

from renyiprune.data.datasets import load_split
from renyiprune.data.images import load_image
from renyiprune.experiments.probe import feature_view, fit_probe, is_holdout
from renyiprune.models.model import create_model
from renyiprune.training.train import CHECKPOINT, METRICS, WEIGHTS, TrainConfig, train
from renyiprune.training.transforms import eval_view

REPO = Path(__file__).resolve().parents[2]
DEMO_WEIGHTS = REPO / "demo" / "weights" / "deit_tiny_patch16_224.safetensors"
CLASSES = (0, 1, 2)


@pytest.fixture(scope="module")
def cars(shared_assets, tmp_path_factory) -> Path:
    """A Stanford Cars root (split folders) holding the real images of three classes."""
    src = shared_assets / "stanford-cars"
    root = tmp_path_factory.mktemp("cars")
    shutil.copy(src / "classes.txt", root / "classes.txt")
    for split in ("train", "val"):
        rows = [r.split("\t") for r in (src / split / "labels.tsv").read_text().splitlines()]
        rows = [r for r in rows if r[0] and not r[0].startswith("#") and int(r[1]) in CLASSES]
        (root / split).mkdir()
        text = "".join("\t".join([str(src / split / r[0]), *r[1:]]) + "\n" for r in rows)
        (root / split / "labels.tsv").write_text(text)
    return root


def settings(cars: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model="deit_tiny_patch16_224", weights=str(DEMO_WEIGHTS), dataset="stanford-cars",
                train_split="train", eval_split="val", criterion="evit", keep=0.7, fuse=True, freeze_blocks=3,
                batch_size=16, epochs=1, lr=1e-4, lr_scale=False, warmup_epochs=0, mixup=0, cutmix=0,
                randaug_n=0, reprob=0, drop_path=0, eval_keep=(0.7,), workers=0, threads=1)  # fmt: skip
    base.update(kw)
    return TrainConfig(str(cars), str(out), **base)


def load(sample):
    return load_image(sample.path)


def evals(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / METRICS).read_text().splitlines()) if r["kind"] == "eval"]


def test_probe_head_starts_where_the_linear_probe_is(cars, tmp_path, capfd):
    """--head-init probe with --transform resize: before any step the unpruned model scores what the
    probe (fitted here independently on the whole-image features of train/) scores on val/."""
    cfg = settings(cars, tmp_path / "a", transform="resize", head_init="probe", max_steps=1,
                   head_cache=str(tmp_path / "cache"))  # fmt: skip
    train(cfg)
    before = {r["config"]: r for r in evals(tmp_path / "a")[0]["results"]}
    model = create_model("deit_tiny_patch16_224", weights=DEMO_WEIGHTS)
    view = feature_view(model, point(None))
    tf = eval_view("resize", model.pretrained_cfg)
    tr, va = load_split("stanford-cars", cars, "train"), load_split("stanford-cars", cars, "val")
    with torch.no_grad():
        x = torch.cat([view(tf(load(s))[None]) for s in tr.samples])
        xv = torch.cat([view(tf(load(s))[None]) for s in va.samples])
    holdout = torch.tensor([is_holdout(s.path) for s in tr.samples])
    head = fit_probe(x, torch.tensor([s.label for s in tr.samples]), 196, holdout)
    right = head.logits(xv).argmax(1) == torch.tensor([s.label for s in va.samples])
    probe_top1 = 100.0 * float(right.float().mean())
    assert before["unpruned"]["top1"] == pytest.approx(probe_top1)
    assert probe_top1 >= 60  # three classes' images behind a 196-class head: far above chance
    assert before["evit r=0.7 +fuse"]["images"] == len(va.samples)
    # A second run finds the features and the head in the cache: nothing is computed again.
    assert "probe features of" in capfd.readouterr().err
    train(settings(cars, tmp_path / "b", transform="resize", head_init="probe", max_steps=1,
                   head_cache=str(tmp_path / "cache")))  # fmt: skip
    assert "probe features of" not in capfd.readouterr().err
    scores = [[(r["config"], r["top1"], r["top5"]) for r in evals(tmp_path / x)[0]["results"]] for x in "ab"]
    assert scores[0] == scores[1]


@pytest.fixture(scope="module")
def center_crop_run(cars, tmp_path_factory) -> tuple[Path, dict]:
    """One epoch (one step of 16 images, the head started from the probe) with eval's own transform,
    evaluated on 16 val images."""
    out = tmp_path_factory.mktemp("center_crop") / "run"
    result = train(settings(cars, out, limit=16, eval_before=False, head_init="probe"))
    assert [r["config"] for r in result["eval"]] == ["unpruned", "evit r=0.7 +fuse"]
    assert result["eval"][0]["top1"] >= 40  # a trained head: agreement below is not two chance scores
    return out, {r["config"]: r for r in result["eval"]}


def test_eval_engine_reproduces_a_center_crop_run(cars, center_crop_run):
    """The run's weights, evaluated by eval's engine (evaluate, EvalTransform, batch 64) on the val
    folder, give the numbers the run reported after its epoch."""
    from renyiprune.data.images import EvalTransform, make_loader
    from renyiprune.experiments.evaluate import evaluate, pruned_view

    out, reported = center_crop_run
    model = create_model("deit_tiny_patch16_224", weights=out / WEIGHTS, num_classes=196)
    loader, _ = make_loader(cars / "val", EvalTransform(), batch_size=64, workers=0, limit=16)
    evit = point("evit", 0.7, 1.0, (3, 6, 9), True)
    views = {"unpruned": pruned_view(model, point(None)), evit.label: pruned_view(model, evit)}
    for r in evaluate(views, loader, progress=False):
        assert (r.top1, r.top5, r.images) == (reported[r.config]["top1"], reported[r.config]["top5"], 16)
        assert r.gmacs == pytest.approx(reported[r.config]["gmacs"])


def test_eval_cli_reproduces_a_center_crop_run(cars, center_crop_run):
    """`renyiprune eval --weights OUT/model.safetensors --data CARS/val` prints the run's numbers."""
    from renyiprune.cli import main

    out, reported = center_crop_run
    text = io.StringIO()
    argv = ["eval", "--weights", str(out / WEIGHTS), "--data", str(cars / "val"),
            "--criterion", "none,evit", "--keep", "0.7", "--fuse", "--limit", "16", "--json",
            "--threads", "1", "--workers", "0", "--no-progress", "--device", "cpu"]  # fmt: skip
    with contextlib.redirect_stdout(text):
        assert main(argv) == 0
    for r in json.loads(text.getvalue())["results"]:
        assert (r["top1"], r["top5"]) == (reported[r["config"]]["top1"], reported[r["config"]]["top5"])


def test_eval_cli_whole_image_view_matches_the_engine(cars, center_crop_run):
    """`eval --transform resize` scores the whole image squashed to 224 (the fine-grained view): the same
    numbers as the engine with that transform, and not those of the center crop on these images."""
    from renyiprune.cli import main
    from renyiprune.data.datasets import eval_transform
    from renyiprune.data.images import make_loader
    from renyiprune.experiments.evaluate import evaluate, pruned_view

    out, reported = center_crop_run
    model = create_model("deit_tiny_patch16_224", weights=out / WEIGHTS, num_classes=196)
    loader, _ = make_loader(cars / "val", eval_transform("resize", model.pretrained_cfg), batch_size=64,
                            workers=0, limit=16)  # fmt: skip
    want = {r.config: r for r in evaluate({"unpruned": pruned_view(model, point(None))}, loader,
                                          progress=False)}  # fmt: skip
    text = io.StringIO()
    argv = ["eval", "--weights", str(out / WEIGHTS), "--data", str(cars / "val"), "--transform", "resize",
            "--criterion", "none", "--limit", "16", "--json", "--threads", "1", "--workers", "0",
            "--no-progress", "--device", "cpu"]  # fmt: skip
    with contextlib.redirect_stdout(text):
        assert main(argv) == 0
    got = json.loads(text.getvalue())  # one configuration: one JSON object
    assert (got["top1"], got["top5"]) == (want["unpruned"].top1, want["unpruned"].top5)
    # the flag reaches the loader: the first image's tensor is the whole-image view, not the crop
    from renyiprune.data.images import EvalTransform, list_samples, load_image

    img = load_image(list_samples(cars / "val")[0].path)
    assert not torch.equal(eval_transform("resize", model.pretrained_cfg)(img), EvalTransform()(img))


def test_benchmark_resumes_skips_and_reports(cars, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import cars_finetune as bench

    from renyiprune.data.images import make_loader
    from renyiprune.experiments.evaluate import evaluate, pruned_view
    from renyiprune.experiments.tune import is_calibration
    from renyiprune.planning.policy import load_policy, policy_entry
    from renyiprune.training.checkpoint import load_checkpoint

    names = ["evit-k0.7", "renyi-a1-k0.7", "renyi-a2-k0.7"]
    common = ["--data-root", str(cars), "--out", str(tmp_path), "--only", *names, "--epochs", "1",
              "--batch-size", "16", "--limit", "32", "--threads", "1", "--workers", "0",
              "--no-progress"]  # fmt: skip
    assert bench.main([*common, "--max-steps", "1"]) == 0  # every run stops after one of its two steps
    assert [load_checkpoint(tmp_path / n / CHECKPOINT)["position"]["global_step"] for n in names] == [1, 1, 1]
    first = {n: json.loads((tmp_path / n / METRICS).read_text().splitlines()[0])["loss"] for n in names}
    assert bench.main(common) == 0  # each resumes
    assert [bench.run_state(tmp_path / n, 1) for n in names] == ["done"] * 3
    for n in names:
        recs = [json.loads(x) for x in (tmp_path / n / METRICS).read_text().splitlines()]
        steps = [r for r in recs if r["kind"] == "step"]
        assert [r["global_step"] for r in steps] == [1, 2] and steps[0]["loss"] == first[n]
    stamps = {n: (tmp_path / n / WEIGHTS).stat().st_mtime_ns for n in names}
    capsys.readouterr()
    assert bench.main(common) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 3
    assert stamps == {n: (tmp_path / n / WEIGHTS).stat().st_mtime_ns for n in names}

    assert bench.main([*common, "--report", "--policy-out", str(tmp_path / "policy.json")]) == 0
    summary = json.loads((tmp_path / "report.json").read_text())
    runs = {r["run"]: r for r in summary["runs"]}
    val = load_split("stanford-cars", cars, "val").samples[:32]
    for n in names:  # the report's numbers are the evaluation engine's on the run's weights and view
        model = create_model("deit_tiny_patch16_224", weights=tmp_path / n / WEIGHTS, num_classes=196)
        cfg = load_checkpoint(tmp_path / n / CHECKPOINT)["config"]
        config = point(cfg["criterion"], cfg["keep"], cfg["alpha"], tuple(cfg["locations"]), True)
        assert cfg["transform"] == "resize" and cfg["freeze_blocks"] == 3
        folder = tmp_path / f"{n}-val"
        folder.mkdir()
        (folder / "labels.tsv").write_text("".join(f"{s.path}\t{s.label}\n" for s in val))
        loader, _ = make_loader(folder, eval_view("resize", model.pretrained_cfg), batch_size=64, workers=0)
        (engine,) = evaluate({"v": pruned_view(model, config)}, loader, progress=False)
        assert (runs[n]["top1"], runs[n]["top5"], runs[n]["images"]) == (engine.top1, engine.top5, len(val))
    evit = runs["evit-k0.7"]
    for n in names[1:]:
        assert runs[n]["vs_evit"]["delta"] == pytest.approx(runs[n]["top1"] - evit["top1"])
    calib = [is_calibration(s.path) for s in val]
    assert summary["calibration_images"] == sum(calib)

    def cal_top1(bits):
        return sum(b == "1" for b, c in zip(bits, calib, strict=True) if c) / max(sum(calib), 1)

    # ties: fewer GMACs, then the grid's order
    best = max(names[1:], key=lambda n: (cal_top1(runs[n]["correct"]), -runs[n]["gmacs"], -names.index(n)))
    assert summary["renyi_alpha_chosen"]["0.7"]["run"] == best
    # the policy file (the probe's schema) gives the same α to `--alpha auto`, and its "best" is the run
    # with the highest calibration top-1 among all three (ties: fewer GMACs, then the grid's order)
    policy = load_policy(tmp_path / "policy.json")
    assert policy_entry(policy, 0.7, "renyi")["label"] == best
    top = max(names, key=lambda n: (cal_top1(runs[n]["correct"]), -runs[n]["gmacs"], -names.index(n)))
    assert policy_entry(policy, 0.7)["label"] == top
    assert "| 0.7 |" in (tmp_path / "report.md").read_text()
