"""train's bookkeeping: a resumed epoch's train_loss counts the whole epoch, --max-steps says it stopped,
--resume with more --epochs extends the run, and unreadable training images stop it in one line or are
skipped and counted (--skip-bad). Tiny models on a dozen real photos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from test_training import config  # the tiny-model training settings both files use
from torch.optim.optimizer import register_optimizer_step_pre_hook

from renyiprune.cli import main
from renyiprune.training.checkpoint import load_checkpoint
from renyiprune.training.train import CHECKPOINT, METRICS, TrainConfig, WarmupCosine, train


def photos(shared_assets, root: Path, n: int, start: int = 0) -> Path:
    """An ImageFolder of ``n`` real photos (shrunk to 64 px) in 3 classes."""
    src = sorted((shared_assets / "imagenet-sample-1000" / "images").glob("*.JPEG"))[start : start + n]
    for i, p in enumerate(src):
        img = Image.open(p).convert("RGB")
        img.thumbnail((64, 64))
        (root / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        img.save(root / f"c{i % 3}" / f"{start + i}.jpg")
    return root


@pytest.fixture(scope="module")
def data(shared_assets, tmp_path_factory):
    return photos(shared_assets, tmp_path_factory.mktemp("train_data"), 12)


def log(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / METRICS).read_text().splitlines()) if r["kind"] == kind]


def test_a_resumed_epoch_reports_the_loss_of_all_its_steps(data, tmp_path, capsys):
    kw = dict(eval_every=1, drop_path=0.1, reprob=0.5)
    train(config(data, tmp_path / "a", **kw))
    capsys.readouterr()
    train(config(data, tmp_path / "b", max_steps=4, **kw))  # stops one step into epoch 2 (3 steps each)
    assert capsys.readouterr().err.splitlines() == [
        "renyiprune train: stopped after 4 steps (--max-steps); resume with --resume"
    ]
    again = train(config(data, tmp_path / "b", max_steps=4, resume=True, **kw))  # already there: no step
    assert again["global_step"] == 4 and "stopped after 4 steps (--max-steps)" in capsys.readouterr().err
    train(config(data, tmp_path / "b", resume=True, **kw))
    assert "stopped" not in capsys.readouterr().err  # ran to its end
    a, b = log(tmp_path / "a", "epoch"), log(tmp_path / "b", "epoch")
    assert [r["steps"] for r in b] == [3, 3]  # not 2: the step before the resume counts too
    assert [r["train_loss"] for r in b] == [r["train_loss"] for r in a]
    assert (tmp_path / "b" / "metrics.csv").read_text() == (tmp_path / "a" / "metrics.csv").read_text()


def test_resume_with_more_epochs_extends_the_run(data, tmp_path, capsys):
    out = tmp_path / "run"
    train(config(data, out, epochs=2))  # 6 steps: the cosine is at min_lr at the end
    used = []
    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    try:
        result = train(config(data, out, epochs=3, resume=True))
    finally:
        hook.remove()
    assert result["global_step"] == 9 and load_checkpoint(out / CHECKPOINT)["position"]["epoch"] == 3
    schedule = WarmupCosine(1e-3, 1e-6, 2e-6, warmup_steps=2, total_steps=9)  # as a 3-epoch run has it
    assert used == pytest.approx([1e-3 * schedule(s) for s in (6, 7, 8)], rel=1e-12)
    assert used[0] > 100 * 2e-6  # not at the end of the old schedule
    line = [x for x in capsys.readouterr().err.splitlines() if "resuming" in x]
    assert line == [f"renyiprune train: resuming {out / CHECKPOINT} at epoch 2/2 → extending to 3 epochs; "
                    f"the cosine schedule is recomputed over 3 epochs from step 6 (lr 2e-06 → {used[0]:.3g})"]
    assert sorted(r["global_step"] for r in log(out, "step")) == list(range(1, 10))
    with pytest.raises(ValueError, match=r"--epochs: checkpoint 3, this command 2 \(on resume --epochs may "
                       r"only grow"):  # fmt: skip
        train(config(data, out, epochs=2, resume=True))


@pytest.fixture(scope="module")
def with_corrupt(shared_assets, tmp_path_factory):
    """train/: 11 photos and one .jpg of garbage bytes (12 images: every one is drawn each epoch);
    val/: 3 good photos."""
    root = tmp_path_factory.mktemp("corrupt")
    photos(shared_assets, root / "train", 11)
    bad = root / "train" / "c2" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG" * 20)
    photos(shared_assets, root / "val", 3, start=20)
    return root, bad


def test_skip_bad_skips_and_counts_unreadable_training_images(with_corrupt, tmp_path, capsys):
    root, _ = with_corrupt
    out = tmp_path / "run"
    result = train(config(root, out, skip_bad=True, eval_every=1, eval_before=False))
    assert result["global_step"] == 6
    assert [(r["steps"], r["skipped"]) for r in log(out, "epoch")] == [(3, 1), (3, 1)]
    assert [r["train_skipped"] for r in log(out, "eval")] == [1, 1]
    assert capsys.readouterr().err.splitlines() == [
        f"renyiprune train: epoch {e}: skipped 1 unreadable training images (--skip-bad)" for e in (1, 2)
    ]
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].endswith(",train_loss,train_skipped") and all(r.endswith(",1") for r in rows[1:])


def test_an_unreadable_training_image_stops_the_run_in_one_line(with_corrupt, shared_assets, tmp_path,
                                                                 capsys):
    root, bad = with_corrupt
    weights = shared_assets / "weights" / "deit_tiny_patch16_224.safetensors"
    args = ["train", "--weights", str(weights), "--data-root", str(root), "--out", str(tmp_path / "run"),
            "--batch-size", "12", "--max-steps", "1", "--criterion", "none", "--mixup", "0", "--cutmix", "0",
            "--no-eval-before", "--workers", "0", "--threads", "1", "--no-progress"]  # fmt: skip
    assert main(args) == 2  # the first batch holds every image
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"renyiprune train: error: cannot read image {bad}: ")
    assert err[0].endswith("; --skip-bad skips unreadable training images")
    assert not (tmp_path / "run" / CHECKPOINT).exists()


def _ddp_worker(rank: int, world: int, port: int, cfg: TrainConfig) -> None:
    import os

    import torch.distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    try:
        train(cfg)
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_lock_once_and_count_every_skipped_image(with_corrupt, tmp_path):
    """Only rank 0 takes OUT's lock (a second taker would stop the run), and the skipped images of both
    processes are counted: 2 x 6 images per epoch, the corrupt one among them."""
    import socket

    import torch.multiprocessing as mp

    root, _ = with_corrupt
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two"
    cfg = config(root, out, batch_size=2, epochs=2, skip_bad=True, mixup=0, cutmix=0)
    mp.spawn(_ddp_worker, args=(2, port, cfg), nprocs=2, join=True)
    assert [(r["steps"], r["skipped"]) for r in log(out, "epoch")] == [(3, 1), (3, 1)]
    assert load_checkpoint(out / CHECKPOINT)["position"] == {"epoch": 2, "step_in_epoch": 0, "global_step": 6}
