"""train --out and the probe's feature cache take one writer at a time (sweep: test_sweep_keys_and_lock)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from plan_points import point

from renyiprune.cli import main
from renyiprune.data.images import EvalTransform, list_samples
from renyiprune.experiments import probe as pr
from renyiprune.models.model import VisionTransformer
from renyiprune.utils.io import LOCK_FILE, OutputInUse

HOLDER = """
import sys, time
from pathlib import Path
from renyiprune.utils.io import output_lock
with output_lock(sys.argv[1]):
    Path(sys.argv[2]).write_text("locked")
    time.sleep(120)
"""


@pytest.fixture
def held(tmp_path):
    """``held(folder)``: another process holds ``folder``'s lock until the test ends; returns its pid."""
    procs = []

    def hold(folder: Path) -> int:
        ready = tmp_path / f"ready{len(procs)}"
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(folder), str(ready)])
        procs.append(proc)
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the lock holder did not start"
            time.sleep(0.05)
        return proc.pid

    yield hold
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_train_stops_at_once_when_out_is_in_use(shared_assets, tmp_path, held, capsys):
    out = tmp_path / "run"
    pid = held(out)
    weights = shared_assets / "weights" / "deit_tiny_patch16_224.safetensors"
    args = ["train", "--weights", str(weights), "--data-root", str(shared_assets / "imagenet-sample-1000"),
            "--dataset", "labels-tsv", "--out", str(out), "--no-progress", "--workers", "0"]  # fmt: skip
    assert main(args) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"renyiprune train: error: {out} is in use by another renyiprune process (pid {pid}); wait for it "
        "or choose another --out"
    ]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written, nothing truncated


def test_feature_cache_computes_only_under_its_lock(shared_assets, tmp_path, held):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=4, num_heads=3, num_classes=5)
    model.eval()
    samples = tuple(list_samples(shared_assets / "imagenet-sample-1000")[:3])
    images = pr.ImageSet("three", samples)
    tf = EvalTransform(input_size=32)
    configs = [point("evit", 0.5, 1.0, (1, 2), True)]
    cache = pr.FeatureCache(tmp_path / "cache", {"model": "tiny", "weights": "w", "transform": "32"})
    opts = pr.ProbeConfig(cache=cache, progress=False)
    first, timing = pr.extract_features(model, configs, [images], tf, opts)
    assert timing["computed"] == 1
    pid = held(tmp_path / "cache")
    again, timing = pr.extract_features(model, configs, [images], tf, opts)
    assert timing["cached"] == 1 and torch.equal(again[(0, 0)], first[(0, 0)])  # reading needs no lock
    other = [point("renyi", 0.5, 2.0, (1, 2), True)]
    with pytest.raises(OutputInUse) as info:  # computing (and writing) does
        pr.extract_features(model, other, [images], tf, opts)
    assert info.value.pid == pid and str(info.value).endswith("wait for it or choose another --cache")
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
