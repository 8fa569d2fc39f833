"""benchmarks/flowers_finetune.py on the real shipped Oxford Flowers-102 files: the grid, a tiny real run
of the unpruned model (its learning curve) and of the CLS-excluded Rényi reading, the report, and
``renyiprune eval --weights ... --dataset flowers102 --split val`` reproducing the reported numbers."""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from pathlib import Path

import pytest

from renyiprune.training.checkpoint import load_checkpoint
from renyiprune.training.train import CHECKPOINT, METRICS, WEIGHTS

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flowers(shared_assets) -> Path:
    root = shared_assets / "flowers102"
    if not (root / "setid.mat").is_file():
        pytest.skip(f"Oxford Flowers-102 not found at {root}")
    return root


def test_grid_is_the_issue_grid():
    import flowers_finetune as ff

    names = [r.name for r in ff.grid("pagerank")]
    assert names[0] == "unpruned"
    for k in ("0.9", "0.7", "0.5"):
        for n in ("evit", "renyi-a1", "renyi-a2", "renyi-ainf", "pagerank"):
            assert f"{n}-k{k}" in names
    assert len(names) == len(set(names)) == 1 + 3 * 5
    extra = [r.name for r in ff.grid("pagerank", extra=True)]
    assert extra == names + ["renyi-exclude-a2-k0.7", "renyi-exclude-a2-k0.5"]
    run = next(r for r in ff.grid("pagerank", extra=True) if r.name == "renyi-exclude-a2-k0.7")
    assert run.flags()[:2] == ["--criterion", "renyi[cls_key=exclude]"]
    assert ff.grid("pagerank")[0].flags() == ["--criterion", "none"]


def test_tiny_real_runs_report_and_eval_reproduces_them(flowers, tmp_path, capsys):
    import flowers_finetune as ff

    from renyiprune.cli import main as cli

    names = ["unpruned", "renyi-exclude-a2-k0.7"]
    common = ["--data-root", str(flowers), "--out", str(tmp_path), "--cls-out-runs", "--only", *names,
              "--epochs", "1",
              "--batch-size", "16", "--limit", "32", "--threads", "1", "--workers", "0",
              "--no-progress"]  # fmt: skip
    assert ff.main(common) == 0
    cfg = load_checkpoint(tmp_path / "renyi-exclude-a2-k0.7" / CHECKPOINT)["config"]
    assert (cfg["criterion"], cfg["alpha"], cfg["keep"], cfg["dataset"]) == (
        "renyi[cls_key=exclude]", 2.0, 0.7, "flowers102")
    assert (cfg["train_split"], cfg["eval_split"], cfg["transform"]) == ("train", "val", "center-crop")
    # the unpruned run is evaluated after its epoch (the learning curve); the pruned runs are not
    curve = [json.loads(x) for x in (tmp_path / "unpruned" / METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in curve if r["kind"] == "eval"] == [1]
    pruned = [json.loads(x) for x in (tmp_path / names[1] / METRICS).read_text().splitlines()]
    assert not [r for r in pruned if r["kind"] == "eval"]

    assert ff.main([*common, "--report"]) == 0
    runs = {r["run"]: r for r in json.loads((tmp_path / "report.json").read_text())["runs"]}
    assert runs["renyi-exclude-a2-k0.7"]["options"] == {"cls_key": "exclude"}
    assert runs["unpruned"]["keep"] == 1.0 and runs["unpruned"]["gmacs"] > runs[names[1]]["gmacs"]
    capsys.readouterr()
    for name, crit in (("unpruned", ["--criterion", "none"]),
                       ("renyi-exclude-a2-k0.7", ["--criterion", "renyi[cls_key=exclude]", "--alpha", "2",
                                                  "--keep", "0.7", "--fuse"])):  # fmt: skip
        text = io.StringIO()
        argv = ["eval", "--weights", str(tmp_path / name / WEIGHTS), "--dataset", "flowers102",
                "--data-root", str(flowers), "--split", "val", *crit, "--limit", "32", "--json",
                "--threads", "1", "--workers", "0", "--no-progress", "--device", "cpu"]  # fmt: skip
        with contextlib.redirect_stdout(text):
            assert cli(argv) == 0
        got = json.loads(text.getvalue())
        assert (got["top1"], got["top5"], got["images"]) == (runs[name]["top1"], runs[name]["top5"], 32)
        assert math.isclose(got["gmacs"], runs[name]["gmacs"], rel_tol=1e-9)
