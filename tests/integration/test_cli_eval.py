"""`renyiprune eval` end to end on real images: JSON output, bad images, bad arguments."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from renyiprune.cli import main
from renyiprune.models.model import MODELS


@pytest.fixture(scope="module")
def weights(shared_assets):
    return shared_assets / "weights" / "deit_tiny_patch16_224.safetensors"


@pytest.fixture
def folder(shared_assets, tmp_path):
    """An ImageFolder tree with a grayscale, a CMYK and an RGBA image and (optionally) a corrupt JPEG."""
    src = sorted((shared_assets / "imagenet-sample-1000" / "images").glob("*.JPEG"))
    root = tmp_path / "data"
    for i, mode in enumerate(["L", "CMYK", "RGBA"]):
        d = root / f"class{i}"
        d.mkdir(parents=True)
        img = Image.open(src[i]).convert(mode)
        img.save(d / ("img.png" if mode == "RGBA" else "img.jpg"))
    return root


def add_corrupt(root):
    data = (root / "class0" / "img.jpg").read_bytes()
    (root / "class0" / "broken.jpg").write_bytes(data[: len(data) // 3])


def test_json_output_one_config(folder, weights, capsys):
    rc = main(["eval", "--weights", str(weights), "--data", str(folder), "--criterion", "renyi",
               "--alpha", "2", "--keep", "0.7", "--json", "--no-progress", "--workers", "0"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert {"top1", "top5", "images", "gmacs", "images_per_s"} <= set(out)
    assert out["images"] == 3 and 0 <= out["top1"] <= 100 and 0.7 < out["gmacs"] < 0.9


def test_corrupt_image_stops_or_is_skipped(folder, weights, capsys):
    add_corrupt(folder)
    args = ["eval", "--weights", str(weights), "--data", str(folder), "--criterion", "none,evit",
            "--no-progress", "--workers", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err and len(err.strip().splitlines()) == 1
    assert main(args + ["--skip-bad", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["images"] for r in out["results"]] == [3, 3]
    assert [r["skipped"] for r in out["results"]] == [1, 1]


def test_table_with_several_configs(folder, weights, capsys):
    assert main(["eval", "--weights", str(weights), "--data", str(folder), "--criterion", "none,evit,renyi",
                 "--alpha", "1,inf", "--no-progress", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    for label in ("unpruned", "evit r=0.7", "renyi a=1 r=0.7", "renyi a=inf r=0.7"):
        assert label in out
    # unpruned ÷ this configuration, read "1.4x fewer GMACs" (it was "GMACs ratio", which read backwards)
    lines = [line for line in out.splitlines() if line.startswith(("unpruned", "evit"))]
    rows = {line.split()[0]: line.split()[-1] for line in lines}
    assert "fewer GMACs" in out and "GMACs ratio" not in out
    assert rows["unpruned"] == "1.00x" and float(rows["evit"].rstrip("x")) > 1


@pytest.mark.parametrize("extra,needle", [
    (["--alpha", "-1"], "alpha"), (["--keep", "0"], "keep rate"), (["--keep", "1.5"], "keep rate"),
    (["--locations", "9,3"], "locations"), (["--locations", "3,12"], "out of range"),
    (["--model", "resnet50"], "model"), (["--criterion", "bogus"], "unknown criterion"),
    (["--data", "/nonexistent/dir"], "no such file"),
])
def test_bad_arguments_one_line_no_traceback(extra, needle, folder, weights):
    args = ["eval", "--weights", str(weights), "--data", str(folder), "--no-progress", *extra]
    p = subprocess.run([sys.executable, "-m", "renyiprune", *args], capture_output=True, text=True)
    assert p.returncode == 2
    assert needle in p.stderr and "Traceback" not in p.stderr
    assert p.stdout == ""


def test_empty_folder_and_mismatched_weights(tmp_path, weights, folder, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--weights", str(weights), "--data", str(tmp_path / "empty"), "--no-progress"]) == 2
    assert "no images" in capsys.readouterr().err
    assert main(["eval", "--model", "deit_small_patch16_224", "--weights", str(weights),
                 "--data", str(folder), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "mis-shaped" in err and "pos_embed" in err


def test_no_network_names_weights_flag(monkeypatch, tmp_path, folder, capsys):
    from dataclasses import replace

    monkeypatch.setenv("RENYIPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(MODELS, "deit_tiny_patch16_224",
                        replace(MODELS["deit_tiny_patch16_224"], url="http://127.0.0.1:9/deit.pth"))
    assert main(["eval", "--data", str(folder), "--no-progress"]) == 2
    assert "--weights" in capsys.readouterr().err
    assert not any((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else True


def test_console_script_installed():
    exe = str(Path(sys.executable).with_name("renyiprune"))
    exe = exe if Path(exe).exists() else shutil.which("renyiprune")
    p = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "eval" in p.stdout


def test_tome_merge_and_budget_configs(folder, weights, capsys):
    assert main(["eval", "--weights", str(weights), "--data", str(folder), "--criterion", "none,tome,evit",
                 "--removed", "merge", "--budget", "0.5", "--json", "--no-progress", "--workers", "0"]) == 0
    res = {r["config"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert set(res) == {"unpruned", "tome budget=0.5", "evit budget=0.5 +merge"}
    full = res["unpruned"]["gmacs"]
    for name in ("tome budget=0.5", "evit budget=0.5 +merge"):
        assert 0.45 * full < res[name]["gmacs"] <= 0.5 * full * 1.01
    assert main(["eval", "--weights", str(weights), "--data", str(folder), "--criterion", "tome",
                 "--tome-r", "8,16", "--json", "--no-progress", "--workers", "0"]) == 0
    res = {r["config"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert res["tome r=16"]["gmacs"] == pytest.approx(0.624, abs=0.005)
    assert res["tome r=8"]["gmacs"] > res["tome r=16"]["gmacs"]


def test_eval_under_torchrun_shards_and_adds_up(shared_assets, weights, tmp_path):
    """2 gloo processes, each on half of 5 images: the same counts and accuracy as one process."""
    root = shared_assets / "imagenet-sample-1000"
    rows = [ln.split("\t") for ln in (root / "labels.tsv").read_text().splitlines() if not ln.startswith("#")]
    (tmp_path / "labels.tsv").write_text("".join(f"{root / f}\t{c}\n" for f, c, *_ in rows[:5]))
    args = ["eval", "--weights", str(weights), "--data", str(tmp_path), "--criterion", "none,renyi",
            "--json", "--no-progress", "--workers", "0", "--batch-size", "2"]
    one = subprocess.run([sys.executable, "-m", "renyiprune", *args], capture_output=True, text=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run([*torchrun, "-m", "renyiprune", *args], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    a, b = json.loads(one.stdout)["results"], json.loads(two.stdout)["results"]
    assert [r["images"] for r in b] == [5, 5]
    assert a[0]["top1"] > 0  # real labels: the unpruned model gets some right
    keys = ("config", "top1", "top5", "images", "paired")  # paired: counts vs unpruned, all-reduced
    assert a[1]["paired"]["a_only"] + a[1]["paired"]["b_only"] <= 5
    for x, y in zip(a, b, strict=True):
        assert [x[k] for k in keys] == [y[k] for k in keys]


def test_dtype_runs_the_forwards_under_autocast(shared_assets, weights, capsys, monkeypatch):
    """--dtype bfloat16: the evaluation forwards run under CPU autocast, and top-1 on 16 real images
    stays within one image of float32."""
    import torch

    from renyiprune.cli import eval as eval_cmd

    seen = []
    real = eval_cmd.evaluate

    def record(module, args):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))

    def spy(models, batches, **kw):
        for m in models.values():
            m.register_forward_pre_hook(record)
        return real(models, batches, **kw)

    data = shared_assets / "imagenet-sample-1000"
    argv = ["eval", "--weights", str(weights), "--data", str(data), "--criterion", "renyi", "--alpha", "2",
            "--keep", "0.7", "--limit", "16", "--json", "--no-progress", "--workers", "0"]  # fmt: skip
    assert main(argv) == 0
    fp32 = json.loads(capsys.readouterr().out)
    monkeypatch.setattr(eval_cmd, "evaluate", spy)
    assert main(argv + ["--dtype", "bfloat16"]) == 0
    bf16 = json.loads(capsys.readouterr().out)
    assert torch.bfloat16 in seen  # the batch forward (the GMACs count afterwards runs in float32)
    assert bf16["images"] == fp32["images"] == 16
    assert abs(bf16["top1"] - fp32["top1"]) <= 100 / 16 + 1e-9
