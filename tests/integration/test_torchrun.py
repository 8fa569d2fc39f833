"""`torchrun ... -m renyiprune train|sweep` through the real launcher: 2 gloo processes on the CPU equal 1.

Each command runs as a subprocess (its own session, killed whole on a timeout, so a hang fails the test
instead of stalling the suite) on 13 demo ImageNet images: an odd count, so the two processes hold
different numbers of images and batches, and the last batch is short.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from renyiprune.models.weights import read_state_dict
from renyiprune.utils import distributed as D

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = REPO / "demo" / "weights" / "deit_tiny_patch16_224.safetensors"
IMAGES = 13  # odd: uneven shards; with per-process batches of 2 the last batch holds one image
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
LIMIT_S = 240  # per command; each took 15-45 s on the loaded 2-core test machine


def run(cmd: list[str], env: dict | None = None, timeout: float = LIMIT_S) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on a timeout kill the whole group (launcher and workers)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[-30:])} did not finish in {timeout} s (hang?)\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A labels.tsv folder of the first 13 demo ImageNet images (absolute paths, ImageNet wnids)."""
    src = REPO / "demo" / "imagenet-100"
    rows = [r.split("\t") for r in (src / "labels.tsv").read_text().splitlines() if r and r[0] != "#"]
    root = tmp_path_factory.mktemp("torchrun_data")
    (root / "labels.tsv").write_text(
        "".join("\t".join([str(src / f), *rest]) + "\n" for f, *rest in rows[:IMAGES])
    )
    return root


def records(path: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def test_train_two_processes_equal_one(data, tmp_path):
    """1 process with batch 4 and 2 processes with batch 2 each: the same images in every step, the same
    losses and weights after 3 steps (to float rounding), the same evaluations before and after."""
    common = ["-m", "renyiprune", "train", "--weights", str(WEIGHTS), "--dataset", "labels-tsv",
              "--data-root", str(data), "--keep", "0.7", "--criterion", "renyi", "--alpha", "2",
              "--epochs", "1", "--lr", "1e-4", "--no-lr-scale", "--warmup-epochs", "0", "--eval-keep", "0.7",
              "--mixup", "0", "--cutmix", "0", "--drop-path", "0", "--workers", "0", "--threads", "1",
              "--no-progress"]  # fmt: skip
    # Batch-level randomness (mixup/cutmix, drop-path) is seeded per process, so it is off; the per-image
    # augmentation (crop, flip, RandAugment, erasing) is seeded per image and stays on.
    t0 = time.perf_counter()
    one = run([sys.executable, *common, "--batch-size", "4", "--out", str(tmp_path / "one")])
    t1 = time.perf_counter()
    two = run([*TORCHRUN, *common, "--batch-size", "2", "--out", str(tmp_path / "two")])
    t2 = time.perf_counter()
    print(f"train: 1 process {t1 - t0:.1f} s, torchrun 2 processes {t2 - t1:.1f} s")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("after 3 steps") == 1  # rank 0 alone reports
    a, b = tmp_path / "one" / "metrics.jsonl", tmp_path / "two" / "metrics.jsonl"

    # Evaluations (epoch 0 and 1; unpruned and keep 0.7 on all 13 images): counts are integers, added
    # up over the processes' shares, so they are equal exactly.
    keys = ("config", "top1", "top5", "images", "gmacs")
    ev_a, ev_b = records(a, "eval"), records(b, "eval")
    assert [r["epoch"] for r in ev_a] == [r["epoch"] for r in ev_b] == [0, 1]
    for x, y in zip(ev_a, ev_b, strict=True):
        assert [[c[k] for k in keys] for c in x["results"]] == [[c[k] for k in keys] for c in y["results"]]
        assert all(c["images"] == IMAGES for c in y["results"])
    assert ev_a[0]["results"][0]["top1"] > 50  # the ImageNet head is kept: the evaluation means something

    # Steps: 13 // 4 = 3 in both (drop_last, no padded repeats). The loss of a step is the mean over the
    # same 4 images: 1 process sums 4 per-image losses, 2 processes two pairs, then all-reduce and halve.
    # Step 1 starts from the same weights, so only the summation order differs: a few ulps (rel 1e-6).
    # Steps 2 and 3 start from weights that differ where AdamW amplified rounding noise (see below;
    # measured rel 1.8e-6 under ATEN_CPU_CAPABILITY=avx2): rel 2e-5, which one wrong image in a step
    # (~1e-2) would exceed by far. Learning rates are exact, gradient norms agree to rel 1e-4.
    st_a, st_b = records(a, "step"), records(b, "step")
    assert [r["global_step"] for r in st_a] == [r["global_step"] for r in st_b] == [1, 2, 3]
    rel = [abs(y["loss"] - x["loss"]) / abs(x["loss"]) for x, y in zip(st_a, st_b, strict=True)]
    print("train: relative loss differences per step", [f"{r:.1e}" for r in rel])
    assert rel[0] <= 1e-6 and max(rel) <= 2e-5, rel
    for x, y in zip(st_a, st_b, strict=True):
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
        assert y["lr"] == x["lr"]

    # Weights. The gradients of the two runs differ in the last bits (summation order: one process sums
    # the 4 images' contributions in one GEMM, two processes sum pairs and all-reduce the halves), and
    # AdamW, which divides each gradient entry by its own running RMS, turns that into weight differences:
    # * key biases (qkv.bias[C:2C]): softmax ignores a constant added to every key logit of a query, so
    #   their gradient is exactly 0 in exact arithmetic and rounding noise in practice, which Adam turns
    #   into steps of about +-lr whatever the noise's sign. They are noise in both runs: left out.
    # * elsewhere, entries whose gradient is as small as its own rounding noise (measured on the 2-core
    #   AMD EPYC: 126 of 5.7 M entries differ by more than 1e-6, by at most 2.6e-5; the update vectors
    #   differ by 1.2e-4 relative L2). Bounds: under 0.1 % of entries past 1e-6 and 1e-3 relative L2.
    #   Other images, or half the gradient, would change most entries' steps (relative difference ~1).
    w0 = read_state_dict(WEIGHTS)
    wa = read_state_dict(tmp_path / "one" / "model.safetensors")
    wb = read_state_dict(tmp_path / "two" / "model.safetensors")
    assert wa.keys() == wb.keys() == w0.keys()
    dim = w0["cls_token"].shape[-1]

    def update(sd: dict) -> torch.Tensor:
        parts = []
        for k in sorted(sd):
            d = (sd[k].double() - w0[k].double()).flatten()
            parts.append(torch.cat([d[:dim], d[2 * dim :]]) if k.endswith("attn.qkv.bias") else d)
        return torch.cat(parts)

    ua, ub = update(wa), update(wb)
    assert float((ua.abs() > 5e-5).double().mean()) > 0.5  # 3 AdamW steps at lr 1e-4 moved most weights
    off = float(((ua - ub).abs() > 1e-6).double().mean())
    rel = float((ua - ub).norm() / ua.norm())
    assert off < 1e-3 and rel < 1e-3, f"{off:.2%} of the weights differ by > 1e-6; relative L2 {rel:.3g}"


def sweep_args(data: Path, out: Path, criteria: str) -> list[str]:
    return ["-m", "renyiprune", "sweep", "--weights", str(WEIGHTS), "--data", str(data), "--criterion",
            criteria, "--alpha", "2", "--keep", "0.7", "--adaptive", "renyi", "--batch-size", "2",
            "--workers", "0", "--threads", "1", "--no-progress", "--out", str(out)]  # fmt: skip


def test_sweep_two_processes_write_what_one_writes(data, tmp_path):
    """The 2-process sweep's results.jsonl holds the 1-process records (timings aside), also when it
    resumes a run of its own; only rank 0 writes."""
    t0 = time.perf_counter()
    one = run([sys.executable, *sweep_args(data, tmp_path / "one", "evit,renyi")])
    t1 = time.perf_counter()
    part = run([*TORCHRUN, *sweep_args(data, tmp_path / "two", "evit")])  # unpruned, evit, renyi budget
    t2 = time.perf_counter()
    rest = run([*TORCHRUN, *sweep_args(data, tmp_path / "two", "evit,renyi")])  # resumes: renyi is new
    t3 = time.perf_counter()
    print(f"sweep: 1 process {t1 - t0:.1f} s, torchrun {t2 - t1:.1f} s + resumed {t3 - t2:.1f} s")
    for p in (one, part, rest):
        assert p.returncode == 0, p.stderr[-3000:]
    assert "3 configurations (3 run now, 0 resumed)" in part.stdout
    assert "4 configurations (1 run now, 3 resumed)" in rest.stdout
    assert rest.stdout.count("configurations (") == 1  # rank 0 alone reports

    def load(out: Path) -> dict[str, dict]:
        lines = (out / "results.jsonl").read_text().splitlines()
        recs = [json.loads(x) for x in lines]
        assert len(recs) == 4, lines  # each config once: no rank appended a duplicate
        return {r["label"]: {k: v for k, v in r.items() if k != "seconds"} for r in recs}

    a, b = load(tmp_path / "one"), load(tmp_path / "two")
    assert sorted(a) == sorted(b) == ["evit r=0.7", "renyi a=2 budget r=0.7", "renyi a=2 r=0.7", "unpruned"]
    for label in a:
        # Fixed keep rates: exact, nll included. Each image runs in the batch it is in with one process
        # (whole-batch shards), on one thread, so its logits are bit-identical, and the outcomes are put
        # back in image order before the record is made.
        x, y = a[label], b[label]
        assert x["images"] == IMAGES and len(x["correct"]) == IMAGES
        if "budget" not in label:
            assert y == x, label
            continue
        # Budget mode regroups each process's images by keep count, so a batch holds other images than
        # with one process; float32 kernels then round some logits (and calibration scores) differently
        # in the last bits (measured: nll 1.0286922484 vs 1.0286922816, rel 3e-8). The threshold and
        # nll agree to rel 1e-6; outcomes, counts and GMACs are exact (no decision sits within 1e-6 of
        # a tie on these 13 images).
        assert y["nll"] == pytest.approx(x["nll"], rel=1e-6)
        assert y["details"]["threshold"] == pytest.approx(x["details"]["threshold"], rel=1e-6)
        same = ("label", "config", "top1", "top5", "correct", "gmacs", "images", "run")
        assert [y[k] for k in same] == [x[k] for k in same]
        assert y["details"]["mean_keep_rate"] == x["details"]["mean_keep_rate"]
    assert a["unpruned"]["top1"] > 50
    for f in ("results.csv", "results.md", "timing.json"):
        assert (tmp_path / "two" / f).is_file()


STUCK = """
import sys, time, torch
from renyiprune.utils import distributed as D
info = D.init_distributed("cpu")
t0 = time.perf_counter()
try:
    if info.rank == 0:
        D.all_reduce_sum(torch.ones(3))  # a collective rank 1 never joins
    elif sys.argv[1] == "barrier":
        torch.distributed.barrier()  # a different collective (the old train hang: eval vs barrier)
    else:
        time.sleep(300)
except RuntimeError as e:
    print(f"rank {info.rank} raised after {time.perf_counter() - t0:.1f} s: {e}", flush=True)
    raise
"""


@pytest.mark.parametrize("other", ["sleep", "barrier"])
def test_a_collective_that_cannot_complete_raises(tmp_path, other):
    script = tmp_path / "stuck.py"
    script.write_text(STUCK)
    t0 = time.perf_counter()
    p = run([*TORCHRUN, str(script), other], env={D.TIMEOUT_ENV: "3"}, timeout=120)
    elapsed = time.perf_counter() - t0
    assert p.returncode != 0
    # rank 0 waits in a collective rank 1 never joins; with a barrier on rank 1 both time out, and the two
    # ranks' lines may interleave on one line of the launcher's output
    m = re.search(r"rank 0 raised after ([0-9.]+) s: (.*?)(?=rank \d raised after|$)", p.stdout, re.S | re.M)
    assert m, p.stdout + p.stderr[-2000:]
    waited = float(m.group(1))
    assert 2.5 <= waited < 30, p.stdout  # the 3 s timeout, not a hang (rank 1 would sleep 300 s)
    assert "Timed out" in m.group(2)
    assert elapsed < 100


def test_timeout_setting(monkeypatch):
    monkeypatch.delenv(D.TIMEOUT_ENV, raising=False)
    assert D.timeout_seconds() == D.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(D.TIMEOUT_ENV, "12.5")
    assert D.timeout_seconds() == 12.5 and D.timeout_seconds(7) == 7.0
    for bad in ("abc", "0", "-1", "inf"):
        monkeypatch.setenv(D.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match="seconds"):
            D.timeout_seconds()


@pytest.mark.parametrize(
    "n,batch,world", [(13, 2, 2), (13, 4, 2), (3, 8, 2), (10, 3, 3), (0, 2, 2), (7, 1, 4)]
)
def test_batch_shard_covers_every_image_once_in_its_one_process_batch(n, batch, world):
    shards = [D.batch_shard(n, batch, r, world) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    one = [list(range(s, min(s + batch, n))) for s in range(0, n, batch)]  # one process's batches
    for r, s in enumerate(shards):
        assert [s[i : i + batch] for i in range(0, len(s), batch)] == one[r::world]


def test_all_gather_cat_without_a_group_is_identity():
    t = torch.tensor([True, False])
    assert D.all_gather_cat(t) is t and D.broadcast_object({"a": 1}) == {"a": 1} and D.rank() == 0
