"""Training: exact resume, atomic checkpoints under a kill, DDP (gloo, 2 processes) = 1 process, reload."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from renyiprune.models.model import create_model
from renyiprune.models.weights import read_state_dict
from renyiprune.training.checkpoint import load_checkpoint
from renyiprune.training.train import CHECKPOINT, METRICS, WEIGHTS, TrainConfig, train

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)


@pytest.fixture(scope="module")
def data(shared_assets, tmp_path_factory):
    """An ImageFolder of 12 real photos (shrunk to 64 px) in 3 classes."""
    root = tmp_path_factory.mktemp("train_data")
    src = sorted((shared_assets / "imagenet-sample-1000" / "images").glob("*.JPEG"))[:12]
    for i, p in enumerate(src):
        img = Image.open(p).convert("RGB")
        img.thumbnail((64, 64))
        (root / f"c{i % 3}").mkdir(exist_ok=True)
        img.save(root / f"c{i % 3}" / f"{i}.jpg")
    return root


def config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        model_kwargs=TINY, locations=(1, 2), keep=0.5, fuse=True, epochs=2, batch_size=4, lr=1e-3,
        lr_scale=False, warmup_epochs=0.5, workers=0, threads=1, progress=False, eval_keep=(0.5,),
        eval_every=0,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(str(data), str(out), **base)


def steps(out: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (out / METRICS).read_text().splitlines()]
    return {r["global_step"]: r["loss"] for r in recs if r["kind"] == "step"}


def test_resume_continues_exactly(data, tmp_path):
    # Full recipe: random crops, RandAugment, erasing, mixup/cutmix, drop-path, pruning with fusion.
    full = train(config(data, tmp_path / "a", drop_path=0.1, reprob=0.5, clip_grad=1.0))
    assert full["global_step"] == 6
    train(config(data, tmp_path / "b", drop_path=0.1, reprob=0.5, clip_grad=1.0, max_steps=4))  # "crash"
    pos = load_checkpoint(tmp_path / "b" / CHECKPOINT)["position"]
    assert pos == {"epoch": 1, "step_in_epoch": 1, "global_step": 4}  # mid-epoch
    with pytest.raises(ValueError, match="--resume"):
        train(config(data, tmp_path / "b"))
    train(config(data, tmp_path / "b", drop_path=0.1, reprob=0.5, clip_grad=1.0, resume=True))
    a, b = steps(tmp_path / "a"), steps(tmp_path / "b")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    assert b == a  # bit-identical losses, including the steps after the resume
    wa, wb = read_state_dict(tmp_path / "a" / WEIGHTS), read_state_dict(tmp_path / "b" / WEIGHTS)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_saved_weights_load_for_eval(data, tmp_path):
    out = tmp_path / "run"
    result = train(config(data, out, epochs=1, eval_every=1, mixup=0, cutmix=0, ema_decay=0.9))
    assert {r["config"] for r in result["eval"]} == {"unpruned", "renyi a=2 r=0.5 +fuse"}
    for f in (WEIGHTS, CHECKPOINT):  # the .safetensors and the full checkpoint both load strictly
        model = create_model("deit_tiny_patch16_224", weights=out / f, num_classes=3, **TINY)
        assert model.head.out_features == 3
    assert (out / "model_ema.safetensors").is_file()
    csv = (out / "metrics.csv").read_text().splitlines()
    assert csv[0].startswith("epoch,global_step,config,top1") and len(csv) == 5  # before + after, 2 configs


KILL_BETWEEN_WRITES = """
import os, signal, sys, torch
from renyiprune.training import checkpoint
path = sys.argv[1]
checkpoint.save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "position": {"global_step": 1}})
real = os.replace
def die(src, dst):  # the new file is fully written to its temporary name; die before the rename
    os.kill(os.getpid(), signal.SIGKILL)
os.replace = die
checkpoint.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "position": {"global_step": 2}})
"""


def test_checkpoint_survives_a_kill_between_writes(tmp_path):
    path = tmp_path / "last.pt"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILL_BETWEEN_WRITES), str(path)])
    assert proc.returncode == -9
    state = load_checkpoint(path)  # the old checkpoint, complete
    assert state["position"]["global_step"] == 1 and torch.equal(state["model"]["w"], torch.zeros(3))
    assert read_state_dict(path).keys() == {"w"}


def _grads_to_file(step, module, loss):
    if step == 0:
        out = Path(os.environ["RP_GRAD_OUT"])
        grads = {n: p.grad.clone() for n, p in module.named_parameters()}
        torch.save(grads, out / f"grads{os.environ.get('RANK', '0')}.pt")


def _ddp_worker(rank, world, port, cfg):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    try:
        train(cfg, callback=_grads_to_file)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_one(data, tmp_path, monkeypatch):
    # Per-image augmentation is seeded by the image, so it is on; batch-level randomness is off.
    kw = dict(mixup=0, cutmix=0, drop_path=0, max_steps=1, epochs=1, reprob=0.5)
    monkeypatch.setenv("RP_GRAD_OUT", str(tmp_path))
    train(config(data, tmp_path / "one", batch_size=4, **kw), callback=_grads_to_file)
    one = torch.load(tmp_path / "grads0.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config(data, tmp_path / "two", batch_size=2, **kw)  # 2 x 2 = the same global batch of 4
    mp.spawn(_ddp_worker, args=(2, port, cfg), nprocs=2, join=True)
    two = [torch.load(tmp_path / f"grads{r}.pt") for r in (0, 1)]
    assert one.keys() == two[0].keys()
    for name, g in one.items():
        torch.testing.assert_close(two[0][name], g, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(two[1][name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert steps(tmp_path / "two")[1] == pytest.approx(steps(tmp_path / "one")[1], rel=1e-6)


# ------------------------------------------------------------------------------ the checkpoint's head

REPO = Path(__file__).resolve().parents[2]
DEMO_WEIGHTS = REPO / "demo" / "weights" / "deit_tiny_patch16_224.safetensors"


def demo_tsv(root: Path, n: int, columns: int = 4) -> Path:
    """labels.tsv of the first ``n`` demo ImageNet images (absolute paths), with or without wnids."""
    src = REPO / "demo" / "imagenet-100"
    rows = [r.split("\t") for r in (src / "labels.tsv").read_text().splitlines() if r and r[0] != "#"]
    root.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join([str(src / r[0]), *r[1:columns]]) for r in rows[:n]]
    (root / "labels.tsv").write_text("\n".join(lines) + "\n")
    return root


def reference_top1(root: Path) -> float:
    """Top-1 (%) of the checkpoint as it is, image by image: the number a kept head starts from."""
    from renyiprune.data.images import EvalTransform, list_samples, load_image

    model = create_model("deit_tiny_patch16_224", weights=DEMO_WEIGHTS)
    tf = EvalTransform()
    samples = list_samples(root)
    with torch.no_grad():
        right = [int(model(tf(load_image(s.path))[None]).argmax()) == s.label for s in samples]
    return 100.0 * sum(right) / len(samples)


def test_imagenet_labels_keep_the_pretrained_head(tmp_path):
    """A labels.tsv naming ImageNet's classes keeps the ImageNet head: epoch-0 top-1 is the checkpoint's
    own (80 % measured, not chance); --no-keep-head trains a new head from chance. 10 demo images."""
    data = demo_tsv(tmp_path / "data", 10)
    kw = dict(model="deit_tiny_patch16_224", weights=str(DEMO_WEIGHTS), dataset="labels-tsv", epochs=1,
              max_steps=1, batch_size=4, eval_every=1, eval_keep=(0.7,), workers=0, threads=1,
              progress=False, mixup=0, cutmix=0)  # fmt: skip
    kept = train(TrainConfig(str(data), str(tmp_path / "kept"), criterion="renyi", **kw))
    top1 = {r["config"]: r["top1"] for r in kept["eval"]}
    assert top1["unpruned"] == pytest.approx(reference_top1(data)) and top1["unpruned"] >= 50
    assert top1["renyi a=2 r=0.7"] >= 40  # pruned at keep 0.7: still far above chance (0.1 %)
    new = train(TrainConfig(str(data), str(tmp_path / "new"), criterion="none", keep_head=False, **kw))
    assert new["eval"][0]["top1"] <= 20  # a fresh 91-class head: chance (measured 1 of 10)
    saved = read_state_dict(tmp_path / "kept" / WEIGHTS)
    assert saved["head.weight"].shape[0] == 1000
    assert read_state_dict(tmp_path / "new" / WEIGHTS)["head.weight"].shape[0] == 91  # 1 + largest label (90)


def test_resolve_head_rules(tmp_path, data):
    from renyiprune.data.datasets import load_split
    from renyiprune.training.train import imagenet1k_wnids, resolve_head

    wnids = imagenet1k_wnids()
    assert len(wnids) == 1000 and wnids == sorted(wnids) and wnids[0] == "n01440764"
    named = load_split("labels-tsv", demo_tsv(tmp_path / "named", 12), "train")  # labels up to 110
    bare = load_split("labels-tsv", demo_tsv(tmp_path / "bare", 12, columns=2), "train")
    folder = load_split("imagefolder", data, "train")  # 3 class folders
    assert resolve_head(None, None, named, 1000)[:2] == (1000, True)  # wnids are ImageNet's
    assert resolve_head(None, None, bare, 1000)[:2] == (111, False)  # nothing says they are
    assert resolve_head(True, None, bare, 1000)[:2] == (1000, True)  # forced: indices fit
    assert resolve_head(False, None, named, 1000)[:2] == (111, False)
    assert resolve_head(None, None, named, 21843)[:2] == (111, False)  # not an ImageNet-1k head
    assert resolve_head(None, None, folder, 3)[:2] == (3, True)  # same class count: kept (as before)
    assert resolve_head(None, 1000, bare, 1000)[:2] == (1000, True)
    # a wnid at the wrong index: not ImageNet's label space
    rows = (tmp_path / "named" / "labels.tsv").read_text().replace("\t0\tn01440764", "\t1\tn01440764")
    (tmp_path / "named" / "labels.tsv").write_text(rows)
    shifted = load_split("labels-tsv", tmp_path / "named", "train")
    assert resolve_head(None, None, shifted, 1000)[1] is False
    with pytest.raises(ValueError, match="1000 classes but imagefolder has 3"):
        resolve_head(True, None, folder, 1000)
    with pytest.raises(ValueError, match="class index 110"):
        resolve_head(True, None, bare, 100)
    with pytest.raises(ValueError, match="--num-classes 5"):
        resolve_head(True, 5, bare, 1000)
    with pytest.raises(ValueError, match="no pretrained head"):
        resolve_head(True, None, bare, None)


def test_cli_keep_head_flag(tmp_path):
    from renyiprune.cli import build_parser
    from renyiprune.cli.train import config_from_args

    base = ["train", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]
    parse = build_parser().parse_args
    assert config_from_args(parse(base)).keep_head is None
    assert config_from_args(parse([*base, "--keep-head"])).keep_head is True
    assert config_from_args(parse([*base, "--no-keep-head"])).keep_head is False
    assert config_from_args(parse([*base, "--dist-timeout", "30"])).dist_timeout == 30.0
    with pytest.raises(SystemExit) as exit_:  # refused while parsing: one line, exit 2
        parse([*base, "--dist-timeout", "0"])
    assert exit_.value.code == 2


# ------------------------------------------------------------------ cost levers and resume safety


def test_frozen_prefix_records_no_graph():
    """--freeze-blocks 2: blocks 0-1 produce tensors outside autograd, block 2 onwards inside it."""
    from renyiprune.training.freeze import freeze_prefix

    outs = {}
    for n in (0, 2):
        model = create_model("deit_tiny_patch16_224", num_classes=3, **TINY).train()
        names = freeze_prefix(model, n)
        for i in (1, 2):
            model.blocks[i].register_forward_hook(lambda m, a, o, key=(n, i): outs.__setitem__(key, o))
        model(torch.randn(2, 3, 32, 32))
        if n == 2:
            assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.mlp.fc2.bias"} <= {*names}
            assert not any(x.startswith(("blocks.2.", "blocks.3.", "norm.", "head.")) for x in names)
    assert outs[(0, 1)].requires_grad  # nothing frozen: the whole forward is recorded
    assert outs[(2, 1)].grad_fn is None and not outs[(2, 1)].requires_grad
    assert outs[(2, 2)].requires_grad
    with pytest.raises(ValueError, match="0..4"):
        freeze_prefix(create_model("deit_tiny_patch16_224", num_classes=3, **TINY), 5)


def test_freeze_blocks_keeps_the_prefix_as_it_started(data, tmp_path):
    seen = {}

    def first_step(step, module, loss):
        if step == 0:  # after the first backward, before the first optimiser step
            seen["start"] = {n: p.detach().clone() for n, p in module.named_parameters()}
            seen["grad"] = {n: p.grad is not None for n, p in module.named_parameters()}
            seen["training"] = [b.training for b in module.blocks]

    train(config(data, tmp_path / "f", freeze_blocks=2, drop_path=0.5), callback=first_step)
    end = read_state_dict(tmp_path / "f" / WEIGHTS)
    frozen = {n for n in end if n in ("cls_token", "pos_embed") or n.startswith(("patch_embed.", "blocks.0.",
                                                                                  "blocks.1."))}  # fmt: skip
    assert len(frozen) == 2 + 2 + 2 * 12  # embeddings and two blocks of 12 tensors each
    assert all(torch.equal(end[n], seen["start"][n]) and not seen["grad"][n] for n in frozen)
    trained = set(end) - frozen
    assert all(seen["grad"][n] and not torch.equal(end[n], seen["start"][n]) for n in trained)
    assert seen["training"] == [False, False, True, True]  # frozen blocks: no drop-path


def test_resume_refuses_other_settings_and_continues_exactly(data, tmp_path):
    import re

    kw = dict(freeze_blocks=1, transform="resize", crop_scale=0.3, drop_path=0.1, reprob=0.5, save_every=1)
    train(config(data, tmp_path / "a", **kw))  # uninterrupted
    train(config(data, tmp_path / "b", max_steps=3, **kw))  # "crash" mid-epoch
    ckpt, log = tmp_path / "b" / CHECKPOINT, tmp_path / "b" / METRICS
    before = ckpt.read_bytes(), log.read_bytes()
    changes = [
        (dict(criterion="evit"), "--criterion: checkpoint 'renyi', this command 'evit'"),
        (dict(alpha=float("inf")), "--alpha: checkpoint 2.0, this command inf"),
        (dict(keep=0.7), "--keep: checkpoint 0.5, this command 0.7"),
        (dict(locations=(1, 3)), "--locations: checkpoint [1, 2], this command [1, 3]"),
        (dict(fuse=False), "--fuse: checkpoint True, this command False"),
        (dict(freeze_blocks=0), "--freeze-blocks: checkpoint 1, this command 0"),
        (dict(transform="center-crop"), "--transform: checkpoint 'resize', this command 'center-crop'"),
        (dict(lr=1e-2), "--lr: checkpoint 0.001, this command 0.01"),
    ]
    for change, message in changes:
        with pytest.raises(ValueError, match=re.escape(message)):
            train(config(data, tmp_path / "b", resume=True, **{**kw, **change}))
    assert (ckpt.read_bytes(), log.read_bytes()) == before  # refused before anything was written
    train(config(data, tmp_path / "b", resume=True, workers=1, **kw))  # how it runs may change
    a, b = steps(tmp_path / "a"), steps(tmp_path / "b")
    assert sorted(b) == [1, 2, 3, 4, 5, 6] and b == a  # bit-identical after the resume
    wa, wb = read_state_dict(tmp_path / "a" / WEIGHTS), read_state_dict(tmp_path / "b" / WEIGHTS)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_reads_settings_older_checkpoints_lack_as_defaults(data, tmp_path):
    from dataclasses import replace

    from renyiprune.training.resume import config_record, resume_mismatches

    cfg = config(data, tmp_path)
    stored = config_record(cfg)
    for name in ("freeze_blocks", "transform", "crop_scale", "head_init"):
        del stored[name]  # a checkpoint written before these settings existed
    assert resume_mismatches(stored, cfg, 1, None) == []
    assert resume_mismatches(stored, replace(cfg, freeze_blocks=3), 1, None) == [
        "--freeze-blocks: checkpoint 0, this command 3"
    ]
    assert resume_mismatches(stored, cfg, 1, 2) == ["processes: checkpoint 2, this command 1"]
    operational = replace(cfg, workers=3, max_steps=9, threads=2, eval_every=5, data_root="/elsewhere")
    assert resume_mismatches(stored, operational, 1, 1) == []


def test_whole_image_training_view_is_the_evaluation_view(shared_assets):
    from renyiprune.data.datasets import ResizeTransform
    from renyiprune.training.transforms import WholeImageTrainTransform

    img = Image.open(shared_assets / "stanford-cars" / "train" / "images" / "00001.jpg")
    assert img.width > img.height  # a wide frame: a center crop would cut the car's ends
    plain = dict(randaug_n=0, reprob=0.0)
    view = ResizeTransform()(img)
    whole = WholeImageTrainTransform(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, **plain)
    assert torch.equal(whole(img, 7), view)
    flipped = WholeImageTrainTransform(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0, **plain)
    assert torch.equal(flipped(img, 7), view.flip(-1))
    boxes = WholeImageTrainTransform(scale=(0.3, 1.0), hflip=0.0, **plain)
    first = boxes(img, 1)
    assert torch.equal(first, boxes(img, 1)) and not torch.equal(first, boxes(img, 2))
    assert not torch.equal(first, view)


def test_train_evaluates_with_the_chosen_transform(data, tmp_path):
    """The evaluation inside train uses --transform's view: its top-1 is what that view gives offline."""
    from renyiprune.data.datasets import load_split
    from renyiprune.training.transforms import eval_view

    cfg = config(data, tmp_path / "r", transform="resize", epochs=1, eval_every=1, eval_before=False)
    result = train(cfg)
    model = create_model("deit_tiny_patch16_224", weights=tmp_path / "r" / WEIGHTS, num_classes=3, **TINY)
    split = load_split("imagefolder", data, "val")
    top1 = {}
    for kind in ("resize", "center-crop"):
        tf = eval_view(kind, model.pretrained_cfg)
        with torch.no_grad():
            right = [int(model(tf(Image.open(s.path))[None]).argmax()) == s.label for s in split.samples]
        top1[kind] = 100.0 * sum(right) / len(right)
    assert result["eval"][0]["config"] == "unpruned"
    assert result["eval"][0]["top1"] == pytest.approx(top1["resize"])
    assert top1["resize"] != top1["center-crop"]  # the two views disagree on these images


def test_cli_cost_flags(tmp_path, capsys):
    from renyiprune.cli import build_parser
    from renyiprune.cli.train import config_from_args

    base = ["train", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]
    parse = build_parser().parse_args

    def levers(cfg):
        return cfg.freeze_blocks, cfg.transform, cfg.crop_scale, cfg.head_init

    assert levers(config_from_args(parse(base))) == (0, "center-crop", 0.08, "new")
    cfg = config_from_args(parse([*base, "--freeze-blocks", "3", "--transform", "resize", "--crop-scale",
                                  "0.35", "--head-init", "probe", "--head-cache", "c"]))  # fmt: skip
    assert levers(cfg) == (3, "resize", 0.35, "probe") and cfg.head_cache == "c"
    bad_values = ((["--freeze-blocks", "-1"], "--freeze-blocks"), (["--crop-scale", "0"], "--crop-scale"))
    for bad, message in bad_values:
        with pytest.raises((ValueError, SystemExit)) as err:  # refused by the parser or by the config
            config_from_args(parse([*base, *bad]))
        said = str(err.value) if err.type is ValueError else capsys.readouterr().err
        assert message in said and (err.type is ValueError or err.value.code == 2)
