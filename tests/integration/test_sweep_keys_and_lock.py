"""sweep resume keys weights by their bytes (not their file name), and one --out takes one writer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from renyiprune.cli import main
from renyiprune.data.images import list_samples
from renyiprune.experiments.sweep import fingerprint
from renyiprune.models.model import weights_id
from renyiprune.training.checkpoint import save_weights

CONFIGS = 3  # unpruned, EViT and Rényi at keep 0.7


@pytest.fixture(scope="module")
def assets(shared_assets) -> tuple[Path, Path]:
    weights = shared_assets / "weights" / "deit_tiny_patch16_224.safetensors"
    return weights, shared_assets / "imagenet-sample-1000"


def sweep_args(weights: Path, data: Path, out: Path) -> list[str]:
    return ["sweep", "--weights", str(weights), "--data", str(data), "--criterion", "evit,renyi",
            "--alpha", "2", "--keep", "0.7", "--limit", "4", "--batch-size", "4", "--out", str(out),
            "--no-progress", "--workers", "0"]  # fmt: skip


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def blind_copy(real: Path, path: Path) -> Path:
    """The real weights with a blind head (every image gets class 999), written where a run writes them."""
    sd = load_file(str(real))
    sd["head.weight"].zero_()
    sd["head.bias"].zero_()
    sd["head.bias"][999] = 1.0
    return save_weights(path, sd)


def test_checkpoints_with_one_name_have_two_fingerprints(assets, tmp_path):
    real, data = assets
    a = tmp_path / "run-a" / "model.safetensors"
    a.parent.mkdir()
    shutil.copyfile(real, a)
    b = blind_copy(real, tmp_path / "run-b" / "model.safetensors")
    samples = list_samples(data)[:4]

    def key(weights):
        name = "deit_tiny_patch16_224"
        return fingerprint(name, weights_id(name, weights), str(data.resolve()), samples)

    assert key(a) != key(b)
    assert key(a) == key(tmp_path / "run-a" / "." / "model.safetensors")  # the same bytes: the same key
    assert key(a)["weights"] == key(real)["weights"]  # a copy of the same weights may reuse its results


def test_a_resumed_sweep_does_not_reuse_another_checkpoints_records(assets, tmp_path, capsys):
    real, data = assets
    out, weights = tmp_path / "sweep", tmp_path / "run" / "model.safetensors"
    save_weights(weights, load_file(str(real)))
    assert main(sweep_args(weights, data, out)) == 0
    assert f"{CONFIGS} configurations ({CONFIGS} run now, 0 resumed)" in capsys.readouterr().out
    blind_copy(real, weights)  # another fine-tuning run wrote its model.safetensors at the same path
    assert main(sweep_args(weights, data, out)) == 0
    assert f"{CONFIGS} configurations ({CONFIGS} run now, 0 resumed)" in capsys.readouterr().out
    recs = records(out)
    assert len(recs) == 2 * CONFIGS and len({r["run"]["weights"] for r in recs}) == 2
    unpruned = [r["top1"] for r in recs if r["label"] == "unpruned"]
    assert unpruned[1] == 0.0 < unpruned[0]  # the second checkpoint's own numbers, not the first's
    assert main(sweep_args(weights, data, out)) == 0  # and it resumes its own
    assert f"(0 run now, {CONFIGS} resumed)" in capsys.readouterr().out


# A sweep that stops before its first configuration until RELEASE exists: it holds OUT meanwhile.
GATED_SWEEP = """
import sys, time
from pathlib import Path
from renyiprune.experiments import sweep
real, release = sweep.run_config, Path(sys.argv[1])
def gated(*args, **kwargs):
    deadline = time.monotonic() + 300
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return real(*args, **kwargs)
sweep.run_config = gated
from renyiprune.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_two_concurrent_sweeps_on_one_out(assets, tmp_path):
    real, data = assets
    out, release = tmp_path / "sweep", tmp_path / "release"
    args = sweep_args(real, data, out)
    first = subprocess.Popen([sys.executable, "-c", textwrap.dedent(GATED_SWEEP), str(release), *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        lock = out / ".renyiprune.lock"
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first sweep never took its --out"
            time.sleep(0.1)
        second = subprocess.run([sys.executable, "-m", "renyiprune", *args], capture_output=True, text=True,
                                timeout=300)  # fmt: skip
        assert second.returncode == 2
        assert second.stderr.splitlines() == [
            f"renyiprune sweep: error: {out} is in use by another renyiprune process (pid {first.pid}); "
            "wait for it or choose another --out"
        ]
        assert second.stdout == ""
    finally:
        release.touch()
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert f"({CONFIGS} run now, 0 resumed)" in stdout
    labels = [r["label"] for r in records(out)]
    assert sorted(labels) == sorted(set(labels)) and len(labels) == CONFIGS  # one record per configuration
    again = subprocess.run([sys.executable, "-m", "renyiprune", *args], capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert again.returncode == 0 and f"(0 run now, {CONFIGS} resumed)" in again.stdout
    assert len(records(out)) == CONFIGS


def test_weights_with_nan_stop_a_sweep_in_one_line(assets, tmp_path, capsys):
    real, data = assets
    sd = load_file(str(real))
    sd["blocks.3.mlp.fc1.weight"][0, :2] = float("nan")
    weights = save_weights(tmp_path / "diverged" / "model.safetensors", sd)
    assert main(sweep_args(weights, data, tmp_path / "sweep")) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"renyiprune sweep: error: {weights}: tensor 'blocks.3.mlp.fc1.weight' holds non-finite values "
        "(2 NaN, 0 infinite, of 147456); refusing weights that are not finite (a diverged or corrupted "
        "checkpoint?)"
    ]
    assert not (tmp_path / "sweep" / "results.jsonl").exists()
