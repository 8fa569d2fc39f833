"""Named data sets and criterion options through the real command line (``renyiprune.cli.main``).

The commands that read images (eval, sweep, tune-alpha, tune-budget, visualize; probe in its own way)
take ``--dataset NAME --split SPLIT --data-root DIR`` and read the real Flowers-102 files shipped in
``../shared/assets/flowers102``; a split whose images are absent (its ``test`` split) stops with one line.
Every command taking ``--criterion`` reads options in brackets (``renyi[cls_key=exclude]``), and those
options reach the criterion. A class index the model's head does not have stops the run before any
forward. Each real-model run uses a few images only (``--limit``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import renyiprune as rp
from renyiprune.cli import build_parser, main
from renyiprune.data.images import EvalTransform, Sample, list_samples, load_image
from renyiprune.experiments.tune import split_samples

MISSING_TEST_IMAGES = "6149 of 6149 image files missing"


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def weights(shared_assets) -> Path:
    path = shared_assets / "weights" / "deit_tiny_patch16_224.safetensors"
    if not path.is_file():
        pytest.skip(f"real DeiT-Tiny weights not found at {path}")
    return path


@pytest.fixture(scope="module")
def flowers(shared_assets) -> Path:
    root = shared_assets / "flowers102"
    if not root.is_dir():
        pytest.skip(f"../shared/assets/flowers102 not found: expected the real Flowers-102 files at {root}")
    return root


@pytest.fixture(scope="module")
def val8(flowers) -> list[tuple[Path, int]]:
    """The first 8 images of the official validation split and their 0-based labels, read here from the
    .mat files with scipy alone (not through renyiprune): the independent reference."""
    loadmat = pytest.importorskip("scipy.io").loadmat
    ids = sorted(int(i) for i in loadmat(flowers / "setid.mat")["valid"].ravel())[:8]
    labels = loadmat(flowers / "imagelabels.mat")["labels"].ravel().astype(int)
    return [(flowers / "jpg" / f"image_{i:05d}.jpg", int(labels[i - 1]) - 1) for i in ids]


@pytest.fixture(scope="module")
def flowers_model(weights, val8, tmp_path_factory) -> tuple[Path, list[bool]]:
    """A 102-class checkpoint (DeiT-Tiny's backbone) whose head tells the 8 images apart, and which of them
    it classifies right. The head has two live classes: the images' label, weighted by the mean CLS feature
    of images 0-2, and another class, by the mean of images 3-7; every other class is held far down. So
    top-1 depends on both the pixels and the labels read, and is neither 0 nor 100 %."""
    from safetensors.torch import save_file

    model = rp.create_model("deit_tiny_patch16_224", weights=weights).eval()
    x = torch.stack([EvalTransform()(load_image(p)) for p, _ in val8])
    with torch.no_grad():
        feats = model.forward_features(x)[:, 0]
    label = val8[0][1]
    other = label - 1 if label > 0 else label + 1
    head_w, head_b = torch.zeros(102, feats.shape[1]), torch.full((102,), -1e4)
    head_w[label], head_w[other] = feats[:3].mean(0), feats[3:].mean(0)
    head_b[label] = head_b[other] = 0.0
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["head.weight"], state["head.bias"] = head_w, head_b
    path = tmp_path_factory.mktemp("flowers-head") / "deit_tiny_flowers_head.safetensors"
    save_file(state, str(path))
    preds = (feats @ head_w.T + head_b).argmax(1)
    right = [int(p) == lab for p, (_, lab) in zip(preds, val8, strict=True)]
    assert 0 < sum(right) < len(right)  # informative: some right, some wrong
    return path, right


def run_cli(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    """(exit status, stdout, error lines) of ``renyiprune ARGV`` run in-process."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse rejected a value
        rc = e.code
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("usage:", " "))]
    return rc, out, lines


def named(flowers: Path, split: str = "val", limit: int = 4) -> list:
    return ["--dataset", "flowers102", "--split", split, "--data-root", flowers, "--limit", str(limit)]


QUIET = ["--no-progress", "--workers", "0"]


# ----------------------------------------------------------------------------------- the three flags


def test_eval_on_a_named_split_reports_what_a_labels_tsv_folder_of_the_same_files_does(
    flowers, val8, flowers_model, tmp_path, capsys, images_read
):
    ckpt, right = flowers_model
    folder = tmp_path / "same8"
    folder.mkdir()
    for path, _ in val8:
        shutil.copy(path, folder / path.name)
    (folder / "labels.tsv").write_text("".join(f"{p.name}\t{lab}\n" for p, lab in val8), encoding="utf-8")
    flags = ["--weights", ckpt, "--criterion", "none,renyi", "--keep", "0.5", "--alpha", "2", "--json",
             *QUIET]  # fmt: skip

    rc, out, err = run_cli(["eval", *named(flowers, "val", 8), *flags], capsys)
    assert rc == 0, err
    from_dataset = json.loads(out)["results"]
    assert images_read == [str(p) for p, _ in val8]  # the official files, in the official order
    rc, out, err = run_cli(["eval", "--data", folder, *flags], capsys)
    assert rc == 0, err
    from_folder = json.loads(out)["results"]

    assert [r["config"] for r in from_dataset] == ["unpruned", "renyi a=2 r=0.5"]
    assert from_dataset[0]["images"] == 8
    assert from_dataset[0]["top1"] == pytest.approx(100 * sum(right) / 8)  # 37.5 %: labels and pixels
    fields = ("config", "images", "top1", "top5")
    assert [[r[k] for k in fields] for r in from_dataset] == [[r[k] for k in fields] for r in from_folder]


def test_sweep_reads_the_named_split_and_records_which(flowers, val8, flowers_model, tmp_path, capsys,
                                                      images_read):  # fmt: skip
    ckpt, right = flowers_model
    out_dir = tmp_path / "sweep"
    rc, _, err = run_cli(["sweep", "--weights", ckpt, *named(flowers), "--criterion", "evit", "--keep", "0.7",
                          "--out", out_dir, *QUIET], capsys)  # fmt: skip
    assert rc == 0, err
    assert images_read == [str(p) for p, _ in val8[:4]]
    records = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]
    unpruned = next(r for r in records if r["config"]["criterion"] is None)
    assert unpruned["images"] == 4 and unpruned["top1"] == pytest.approx(100 * sum(right[:4]) / 4)
    assert {r["run"]["data"] for r in records} == {f"flowers102:val:{flowers.resolve()}"}


def test_tune_alpha_splits_the_named_split_by_file_name(flowers, val8, flowers_model, tmp_path, capsys,
                                                       images_read):  # fmt: skip
    ckpt, _ = flowers_model
    calib, evals = split_samples([Sample(p, lab) for p, lab in val8])
    assert calib and evals
    argv = ["tune-alpha", "--weights", ckpt, *named(flowers, "val", 8), "--criterion", "renyi",
            "--alpha", "2", "--keep", "0.7", "--out", tmp_path / "ta", *QUIET]  # fmt: skip
    rc, _, err = run_cli(argv, capsys)
    assert rc == 0, err
    policy = json.loads((tmp_path / "ta" / "policy.json").read_text())
    assert (policy["calibration_images"], policy["evaluation_images"]) == (len(calib), len(evals))
    assert sorted(set(images_read)) == sorted(str(p) for p, _ in val8)


def test_tune_budget_reads_the_named_split(flowers, val8, flowers_model, tmp_path, capsys, images_read):
    ckpt, _ = flowers_model
    calib, evals = split_samples([Sample(p, lab) for p, lab in val8])
    rc, _, err = run_cli(["tune-budget", "--weights", ckpt, *named(flowers, "val", 8), "--criterion", "evit",
                          "--budget", "0.7", "--out", tmp_path / "tb", *QUIET], capsys)  # fmt: skip
    assert rc == 0, err
    policy = json.loads((tmp_path / "tb" / "policy.json").read_text())
    assert policy["budget_split"] == {"calibration_images": len(calib), "evaluation_images": len(evals)}
    assert sorted(set(images_read)) == sorted(str(p) for p, _ in val8)


def test_visualize_draws_the_named_split(flowers, val8, weights, tmp_path, capsys):
    out_dir = tmp_path / "vis"
    rc, _, err = run_cli(["visualize", "--weights", weights, *named(flowers, "val", 2), "--alpha", "2",
                          "--criterion", "evit", "--image-figures", "2", "--out", out_dir, "--no-progress"],
                         capsys)  # fmt: skip
    assert rc == 0, err
    stems = [p.stem for p, _ in val8[:2]]
    assert {f"000_{stems[0]}_entropy.png", f"001_{stems[1]}_masks.png"} <= {p.name for p in out_dir.iterdir()}
    assert json.loads((out_dir / "figures.json").read_text())["config"]["images"] == 2


def test_probe_split_names_the_evaluation_split(flowers, val8):
    from renyiprune.cli import probe

    args = build_parser().parse_args(["probe", "--dataset", "flowers102", "--data-root", str(flowers),
                                      "--train", "train", "--split", "val", "--limit", "3"])  # fmt: skip
    probe.check_args(args)
    train, evals, num_classes = probe._image_sets(args)
    assert [e.name for e in evals] == ["val"] and num_classes == 102
    assert [(s.path, s.label) for s in evals[0].samples] == val8[:3]
    assert train.name == "train" and len(train.samples) == 3 and train.samples[0].path != val8[0][0]
    folder = build_parser().parse_args(["probe", "--train", "a", "--eval", "b", "--split", "val"])
    with pytest.raises(ValueError, match="--split goes with --dataset"):
        probe._image_sets(folder)


COMMANDS = {  # what each command needs besides the data flags (and a folder it would write to)
    "eval": [],
    "sweep": ["--out", "{out}"],
    "tune-alpha": ["--out", "{out}"],
    "tune-budget": ["--out", "{out}"],
    "visualize": ["--out", "{out}"],
}


@pytest.mark.parametrize("cmd", [*COMMANDS, "probe"])
def test_a_split_without_its_images_fails_with_one_line_naming_them(cmd, flowers, weights, tmp_path, capsys):
    out = tmp_path / "out"
    if cmd == "probe":
        argv = ["probe", "--weights", weights, "--dataset", "flowers102", "--data-root", flowers,
                "--train", "train", "--split", "test"]  # fmt: skip
    else:
        argv = [cmd, "--weights", weights, *named(flowers, "test"),
                *[a.format(out=out) for a in COMMANDS[cmd]], *QUIET[:1]]  # fmt: skip
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 2 and len(err) == 1, err
    assert f"flowers102 test: {MISSING_TEST_IMAGES} under {flowers / 'jpg'}" in err[0]
    assert "image_00001.jpg, image_00002.jpg" in err[0] and "image_00017.jpg" not in err[0]
    assert stdout == "" and not out.exists()


def test_the_default_split_is_the_evaluation_split(flowers, weights, capsys):
    argv = ["eval", "--weights", weights, "--dataset", "flowers102", "--data-root", flowers, *QUIET]
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2 and MISSING_TEST_IMAGES in err[0]  # flowers102's evaluation split is test


@pytest.mark.parametrize("flags,needle", [
    (["--data", "{folder}", "--dataset", "flowers102", "--data-root", "{folder}"], "not both"),
    (["--split", "val", "--data", "{folder}"], "--split goes with --dataset"),
    (["--data-root", "{folder}"], "--data-root goes with --dataset"),
    (["--dataset", "flowers102"], "needs --data-root"),
    ([], "give --data DIR or --dataset NAME"),
    (["--dataset", "flowers102", "--data-root", "{folder}", "--split", "everything"], "splits are"),
])  # fmt: skip
def test_data_flag_mistakes_are_one_line(flags, needle, flowers, weights, capsys):
    argv = ["eval", "--weights", weights, *[str(f).format(folder=flowers) for f in flags], *QUIET]
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2 and len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("cmd", [*COMMANDS, "probe"])
def test_every_image_command_parses_the_three_flags_alike(cmd, tmp_path):
    need = {"eval": [], "probe": ["--train", "train", "--eval", "val"]}.get(cmd, ["--out", "o"])
    args = build_parser().parse_args([cmd, *need, "--dataset", "flowers102", "--split", "val",
                                      "--data-root", str(tmp_path)])  # fmt: skip
    assert (args.dataset, args.split, args.data_root) == ("flowers102", "val", tmp_path)


# ----------------------------------------------------------------------------------- criterion options


def library_top1(weights: Path, samples, **patch_kwargs) -> float:
    model = rp.create_model("deit_tiny_patch16_224", weights=weights).eval()
    rp.patch(model, **patch_kwargs)
    x = torch.stack([EvalTransform()(load_image(s.path)) for s in samples])
    with torch.no_grad():
        pred = model(x).argmax(1)
    return 100.0 * float((pred == torch.tensor([s.label for s in samples])).float().mean())


def test_cls_key_in_brackets_reaches_the_criterion(shared_assets, weights, capsys):
    """On real ImageNet images (labels the DeiT head knows) at keep 0.3, excluding the CLS key changes
    top-1; eval's number for each spec is the library's for the same options."""
    data = shared_assets / "imagenet-sample-1000"
    rc, out, err = run_cli(["eval", "--weights", weights, "--data", data, "--limit", "16", "--keep", "0.3",
                            "--alpha", "2", "--criterion", "renyi,renyi[cls_key=exclude]", "--json", *QUIET],
                           capsys)  # fmt: skip
    assert rc == 0, err
    plain, excluded = json.loads(out)["results"]
    assert (plain["config"], excluded["config"]) == ("renyi a=2 r=0.3", "renyi a=2 cls_key=exclude r=0.3")
    samples = list_samples(data)[:16]
    common = dict(keep_rate=0.3, criterion="renyi", alpha=2.0)
    assert excluded["top1"] == pytest.approx(library_top1(weights, samples, cls_key="exclude", **common))
    assert plain["top1"] == pytest.approx(library_top1(weights, samples, **common))
    assert excluded["top1"] != plain["top1"]


def test_bracket_options_override_the_flags_for_that_criterion_only(tmp_path):
    from PIL import Image

    from renyiprune.cli import bench, visualize
    from renyiprune.cli import eval as eval_cmd

    flags = ["--criterion", "renyi[cls_key=exclude;heads=pooled],renyi", "--cls-key", "include",
             "--alpha", "2", "--keep", "0.7"]  # fmt: skip
    for cmd, extra in (("eval", ["--data", "."]), ("probe", ["--train", "t", "--eval", "e"]), ("bench", [])):
        args = build_parser().parse_args([cmd, *extra, *flags])
        build = bench.configs_from_args if cmd == "bench" else eval_cmd.configs_from_args  # probe: eval's
        got = [(d["criterion"], d["alpha"], d["options"]) for d in (c.to_dict() for c in build(args))]
        assert got == [("renyi", 2.0, {"cls_key": "exclude", "heads": "pooled"}),
                       ("renyi", 2.0, {"cls_key": "include"})], cmd  # fmt: skip
    (fixed,) = eval_cmd.configs_from_args(build_parser().parse_args(
        ["eval", "--data", ".", "--criterion", "renyi[alpha=inf]", "--alpha", "1,2"]))  # fmt: skip
    assert fixed.to_dict()["alpha"] == "inf"
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(image)
    args = build_parser().parse_args(["visualize", "--out", "o", "--cls-key", "include", "--alpha", "2",
                                      "--criterion", "renyi[cls_key=exclude],renyi,evit",
                                      str(image)])  # fmt: skip
    specs = visualize.parse_options(args).specs
    assert [(s.label, s.criterion, dict(s.options)) for s in specs] == [
        ("renyi[cls_key=exclude] α=2", "renyi", {"cls_key": "exclude"}),
        ("renyi α=2", "renyi", {"cls_key": "include"}), ("evit", "evit", {})]  # fmt: skip


def test_export_patches_with_the_bracket_options(weights, tmp_path, monkeypatch, capsys):
    from renyiprune.models import export as export_mod

    captured = {}
    monkeypatch.setattr(export_mod, "export_onnx", lambda model, path, image_size: captured.update(m=model))
    rc, out, err = run_cli(["export", "--weights", weights, "--onnx", tmp_path / "m.onnx", "--keep", "0.5",
                            "--alpha", "2", "--criterion", "renyi[cls_key=exclude]"], capsys)  # fmt: skip
    assert rc == 0, err
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for key in ("include", "exclude"):
        ref = rp.create_model("deit_tiny_patch16_224", weights=weights).eval()
        rp.patch(ref, keep_rate=0.5, criterion="renyi", alpha=2.0, cls_key=key)
        with torch.no_grad():
            outputs[key] = ref(x)
    with torch.no_grad():
        exported = captured["m"].eval()(x)
    assert torch.allclose(exported, outputs["exclude"], atol=1e-5)
    assert not torch.allclose(exported, outputs["include"], atol=1e-3)


BOGUS = {  # every command taking --criterion, with what it needs besides (nothing is read or loaded)
    "eval": ["--data", "."],
    "probe": ["--train", "t", "--eval", "e"],
    "sweep": ["--data", ".", "--out", "{out}"],
    "tune-alpha": ["--data", ".", "--out", "{out}"],
    "tune-budget": ["--data", ".", "--out", "{out}"],
    "bench": ["--batch-size", "1"],
    "visualize": ["--out", "{out}", "x.png"],
    "export": ["--onnx", "{out}/m.onnx"],
    "train": ["--data-root", ".", "--out", "{out}"],
}


@pytest.mark.parametrize("cmd", list(BOGUS))
def test_an_unknown_bracket_option_is_one_line(cmd, tmp_path, capsys, images_read):
    out = tmp_path / "out"
    argv = [cmd, *[a.format(out=out) for a in BOGUS[cmd]], "--criterion", "renyi[bogus=1]"]
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 2 and len(err) == 1, err
    assert "criterion 'renyi' has no option bogus" in err[0] and "cls_key" in err[0]
    assert stdout == "" and not out.exists() and images_read == []


# ------------------------------------------------------------------------------- labels vs. the head


@pytest.fixture
def label_1000(shared_assets, tmp_path) -> tuple[Path, str]:
    """Six real ImageNet images in a labels.tsv; the fourth row says class 1000 (DeiT-Tiny has 0-999)."""
    src = sorted((shared_assets / "imagenet-sample-1000" / "images").glob("*.JPEG"))[:6]
    folder = tmp_path / "data"
    folder.mkdir()
    rows = []
    for i, p in enumerate(src):
        shutil.copy(p, folder / p.name)
        rows.append(f"{p.name}\t{1000 if i == 3 else i}\n")
    (folder / "labels.tsv").write_text("".join(rows), encoding="utf-8")
    calib, evals = split_samples(list_samples(folder))
    assert calib and evals  # tune-alpha / tune-budget get past their split to the check
    return folder, src[3].name


@pytest.mark.parametrize("cmd", ["eval", "sweep", "tune-alpha", "tune-budget"])
def test_a_label_the_head_lacks_stops_before_any_image_is_read(cmd, label_1000, weights, tmp_path, capsys,
                                                              images_read):  # fmt: skip
    folder, bad = label_1000
    out = tmp_path / "out"
    argv = [cmd, "--weights", weights, "--data", folder, *QUIET] + ([] if cmd == "eval" else ["--out", out])
    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 2 and len(err) == 1, err
    assert f"{bad}: class index 1000 is not below the model's head size 1000" in err[0]
    assert stdout == "" and not out.exists() and images_read == []  # no image decoded, nothing written
