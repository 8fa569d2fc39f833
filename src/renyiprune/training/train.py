"""Fine-tuning with token pruning in the loop (EViT's recipe), resumable and distributed.

``train(TrainConfig(...))`` builds the model with a head for the data set's classes (the checkpoint's
own when the labels are its classes: ``resolve_head``), patches a
parameter-sharing copy of it to prune while it trains (scores are computed under ``no_grad`` by
``renyiprune.patch``), and runs AdamW with warm-up + cosine, label smoothing, mixup/cutmix, RandAugment,
random erasing, drop-path, optional clipping, AMP and EMA. Cost levers: ``freeze_blocks`` keeps the
embeddings and the first blocks fixed and out of autograd (``freeze``), ``transform`` chooses the crop
(``transforms``: whole-image resize for fine-grained data), ``head_init="probe"`` starts a new head from
the linear probe (``head_init``). After every epoch it evaluates the model
unpruned and pruned at several keep rates; under ``torchrun`` every process evaluates its share of the
images and the counts are added up, so that every rank runs the same collectives. Every checkpoint
(each epoch, every ``save_every`` steps) is atomic and holds everything needed to continue bit-exactly:
all randomness is a function of (seed, epoch, sample index) per image and (seed, step, rank) per step,
and the data position is stored. ``resume`` refuses a command whose settings differ from the
checkpoint's (``resume.check_resume``), except a larger ``epochs``, which extends the run. ``OUT`` is
locked while the run writes to it (``utils.io.output_lock``); the epoch's running loss is in every
checkpoint (``bookkeeping``), and ``skip_bad`` skips unreadable training images, counting them.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from ..core.api import apply, share_parameters
from ..core.plans import UNPRUNED
from ..data.augment import mixup_cutmix, soft_target_cross_entropy
from ..data.datasets import DEFAULT_SPLITS, DatasetSplit, load_split, open_sample
from ..data.images import ImageDataset, Item, collate
from ..experiments.evaluate import evaluate, pruned_view
from ..experiments.probe import FeatureCache, ProbeConfig
from ..models.model import create_model, get_spec, weights_id
from ..models.weights import download, read_state_dict
from ..planning.points import Point
from ..planning.specs import split_criterion
from ..utils import distributed as D
from ..utils.io import atomic_write, output_lock
from .bookkeeping import EpochTally, extend_schedule, readable, reduce_step, say
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, save_weights, set_rng_state
from .freeze import freeze_prefix, frozen_modules
from .head_init import HEAD_INITS, init_head_from_probe, probe_head
from .resume import check_resume
from .transforms import TRANSFORMS, eval_view, train_transform

__all__ = [
    "TrainConfig",
    "WarmupCosine",
    "train",
    "resolve_head",
    "imagenet1k_wnids",
    "CHECKPOINT",
    "WEIGHTS",
    "METRICS",
]

CHECKPOINT = "last.pt"  # full training state, overwritten atomically
WEIGHTS = "model.safetensors"  # model weights only: renyiprune eval --weights OUT/model.safetensors
METRICS = "metrics.jsonl"


@dataclass
class TrainConfig:
    """Every setting of a run; defaults are EViT's DeiT fine-tuning recipe (lr is per 512 images)."""

    data_root: str
    out: str
    dataset: str = "imagefolder"
    model: str = "deit_tiny_patch16_224"
    weights: str | None = None
    pretrained: bool = False  # download the official weights when weights is None
    model_kwargs: dict = field(default_factory=dict)  # extra VisionTransformer arguments (tests)
    train_split: str | None = None
    eval_split: str | None = None
    num_classes: int | None = None
    # the checkpoint's classifier: None keeps it when the data's label space is the checkpoint's
    # (resolve_head), True keeps it or fails, False always starts a fresh head
    keep_head: bool | None = None
    head_init: str = "new"  # new | probe: fit the new head as a linear probe on the training split first
    head_cache: str | None = None  # folder for the probe's features and head (shared by several runs)
    limit: int | None = None  # first N training images (and evaluation images)
    # pruning while training
    keep: float = 0.7
    criterion: str = "renyi"  # "none": train unpruned; options in brackets: "renyi[cls_key=exclude]"
    alpha: float = 2.0
    locations: tuple[int, ...] = (3, 6, 9)
    fuse: bool = False
    # cost: patch/position embedding, CLS token and blocks[:freeze_blocks] fixed, run without autograd
    freeze_blocks: int = 0
    # schedule and optimiser
    epochs: int = 30
    batch_size: int = 64  # per process
    lr: float = 2e-5
    lr_scale: bool = True  # lr * global batch / 512
    min_lr: float = 2e-6
    warmup_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 1e-6
    clip_grad: float | None = None
    # regularisation
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_switch_prob: float = 0.5
    randaug_n: int = 2
    randaug_m: float = 9.0
    reprob: float = 0.25
    drop_path: float = 0.1
    train_crop: bool = True
    transform: str = "center-crop"  # center-crop (DeiT) | resize (the whole image; fine-grained)
    crop_scale: float = 0.08  # smallest share of the image area a training crop covers
    # precision, EMA
    amp: str = "none"  # none | bf16 | fp16 (CUDA only)
    ema_decay: float = 0.0  # 0 = no EMA
    # evaluation, operations
    eval_keep: tuple[float, ...] = (0.5, 0.7, 0.9)
    eval_before: bool = True
    eval_every: int = 1  # epochs; 0 = never
    save_every: int = 0  # steps; 0 = only at epoch ends
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps in total
    skip_bad: bool = False  # skip (and count) unreadable training images instead of stopping
    seed: int = 0
    workers: int = 2
    device: str = "cpu"
    threads: int | None = None
    resume: bool = False
    progress: bool = True
    dist_timeout: float | None = None  # seconds a collective waits (None: $RENYIPRUNE_DIST_TIMEOUT or 600)


class WarmupCosine:
    """LR factor per step: linear warm-up from ``warmup_lr`` to ``lr``, then cosine down to ``min_lr``."""

    def __init__(self, lr: float, warmup_lr: float, min_lr: float, warmup_steps: int, total_steps: int):
        self.lr, self.warmup_lr, self.min_lr = lr, min(warmup_lr, lr), min(min_lr, lr)
        self.warmup_steps, self.total_steps = warmup_steps, max(total_steps, 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            value = self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        else:
            t = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
            value = self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))
        return value / self.lr if self.lr > 0 else 0.0


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class AugmentedImages(Dataset):
    """Training images: decoded (banner cropped), augmented with a seed from (seed, epoch, index).

    An image that cannot be decoded comes back as a bad :class:`~renyiprune.data.images.Item` (as in
    evaluation), so that the main process names it or skips it (``bookkeeping.readable``).
    """

    def __init__(self, split: DatasetSplit, transform: Callable[..., Tensor], seed: int) -> None:
        self.split, self.transform, self.seed, self.epoch = split, transform, seed, 0

    def __len__(self) -> int:
        return len(self.split.samples)

    def __getitem__(self, index: int) -> Item:
        sample = self.split.samples[index]
        try:
            img = open_sample(sample, self.split.crop_bottom)
        except Exception as exc:  # PIL raises many exception types; the main process reports it
            error = f"{type(exc).__name__}: {exc}"
            return Item(torch.empty(0, 3, 0, 0), int(sample.label), index, str(sample.path), error)
        image = self.transform(img, _seed_of(self.seed, self.epoch, index))
        return Item(image, int(sample.label), index, str(sample.path), None)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """timm's rule: no weight decay on biases, norms (1-d tensors), position embedding and CLS token."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in ("pos_embed", "cls_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _Log:
    """Rank-0 metrics: JSON lines (appended; on resume, lines past the checkpoint are dropped) and a CSV."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled, self.out = out / METRICS, enabled, out
        if not enabled:
            return
        lines = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("global_step", 0) <= resume_step:
                    lines.append(line)
        self.path.write_text("".join(x + "\n" for x in lines))
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self.tb is not None:
            step = record.get("global_step", 0)
            for k, v in record.items():
                if isinstance(v, float):
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, step)
        if record["kind"] == "eval":
            self._write_csv()

    def _write_csv(self) -> None:
        """metrics.csv: one row per (evaluation, configuration)."""
        rows = [json.loads(x) for x in self.path.read_text().splitlines()]
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["epoch", "global_step", "config", "top1", "top5", "gmacs", "images", "train_loss",
                    "train_skipped"])  # fmt: skip
        for r in rows:
            if r["kind"] == "eval":
                for c in r["results"]:
                    w.writerow(
                        [
                            r["epoch"],
                            r["global_step"],
                            c["config"],
                            f"{c['top1']:.3f}",
                            f"{c['top5']:.3f}",
                            f"{c['gmacs']:.4f}",
                            c["images"],
                            r.get("train_loss"),
                            r.get("train_skipped"),
                        ]
                    )
        text = buf.getvalue()
        atomic_write(self.out / "metrics.csv", lambda tmp: Path(tmp).write_text(text))


def _plan(cfg: TrainConfig, keep_rate: float) -> Point:
    """The trained criterion (options in brackets: ``renyi[cls_key=exclude]``) at ``keep_rate``."""
    crit, opts = split_criterion(cfg.criterion)
    return Point.from_spec(crit, keep_rate, cfg.alpha, tuple(cfg.locations), cfg.fuse, opts)


def _eval_configs(cfg: TrainConfig) -> list[Point]:
    """The unpruned model and the trained criterion at each evaluation keep rate."""
    if cfg.criterion == "none":
        return [Point(UNPRUNED)]
    return [Point(UNPRUNED), *(_plan(cfg, r) for r in dict.fromkeys(cfg.eval_keep))]


def _evaluate(
    model: nn.Module, cfg: TrainConfig, split: DatasetSplit, dist: D.DistInfo, progress: bool
) -> list[dict]:
    """Top-1/top-5 of the evaluation configurations; every process must call it (counts all-reduced)."""
    samples = split.samples[: cfg.limit] if cfg.limit else split.samples
    batch = max(cfg.batch_size, 1)
    mine = [samples[i] for i in D.batch_shard(len(samples), batch, dist.rank, dist.world_size)]
    loader = DataLoader(
        ImageDataset(mine, eval_view(cfg.transform, model.pretrained_cfg, split.crop_bottom)),
        batch_size=batch,
        num_workers=cfg.workers,
        collate_fn=collate,
    )
    views = {c.label: pruned_view(model, c) for c in _eval_configs(cfg)}
    results = evaluate(views, loader, device=dist.device, total=len(mine), progress=progress,
                       skip_bad=cfg.skip_bad)  # fmt: skip
    return [r.to_dict() for r in results]


def imagenet1k_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids; position = the class index of ImageNet checkpoints' heads."""
    from importlib import resources

    text = resources.files("renyiprune.data").joinpath("imagenet1k_wnids.txt").read_text(encoding="utf-8")
    return [w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#")]


def _tsv_names_imagenet(split: DatasetSplit) -> bool:
    """True when every row of the split's labels.tsv names a WordNet id that is ImageNet-1k's at its
    class index (``file, class_index, wnid[, name]``): its label space is then an ImageNet head's."""
    from ..data.images import LABELS_FILE

    tsv = split.root / LABELS_FILE
    if split.name != "labels-tsv" or not tsv.is_file():
        return False
    wnids = imagenet1k_wnids()
    rows = 0
    for line in tsv.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cols = line.split("\t")
        if len(cols) < 3 or not cols[1].strip().isdigit():
            return False
        index = int(cols[1])
        if index >= len(wnids) or cols[2].strip() != wnids[index]:
            return False
        rows += 1
    return rows > 0


def resolve_head(
    keep_head: bool | None, num_classes: int | None, split: DatasetSplit, checkpoint_classes: int | None
) -> tuple[int, bool, str]:
    """How many classes the trained head has, whether it is the checkpoint's, and why (one line).

    ``keep_head`` None keeps the checkpoint's head when the data's label space is the checkpoint's: the
    same class count (``num_classes`` or the data set's), or a labels.tsv whose WordNet ids are
    ImageNet-1k's at their indices with a 1000-class checkpoint. True keeps it or raises ValueError
    saying why it cannot; False always starts a fresh head.
    """
    data_classes = num_classes or split.num_classes
    max_label = max((s.label for s in split.samples), default=-1)
    if keep_head is False or checkpoint_classes is None:
        if keep_head:
            raise ValueError("--keep-head: there is no pretrained head to keep (no weights, or none in them)")
        return data_classes, False, f"a new {data_classes}-class head"
    c = checkpoint_classes
    if keep_head:
        if num_classes is not None and num_classes != c:
            raise ValueError(
                f"--keep-head keeps the checkpoint's {c}-class head; --num-classes "
                f"{num_classes} differs (drop one of the two)"
            )
        if split.classes and len(split.classes) != c:
            raise ValueError(
                f"--keep-head: the checkpoint's head has {c} classes but {split.name} has "
                f"{len(split.classes)}; its labels are not the checkpoint's classes "
                "(train a new head: leave out --keep-head)"
            )
        if max_label >= c:
            raise ValueError(
                f"--keep-head: the checkpoint's head has {c} classes but the training data "
                f"has class index {max_label} (labels must be the checkpoint's class indices)"
            )
        return c, True, f"the checkpoint's {c}-class head (--keep-head)"
    if data_classes == c:
        return c, True, f"the checkpoint's {c}-class head (the data has as many classes)"
    if num_classes is None and c == 1000 and max_label < c and _tsv_names_imagenet(split):
        return c, True, "the checkpoint's 1000-class head (labels.tsv names ImageNet-1k's classes)"
    return data_classes, False, f"a new {data_classes}-class head (the checkpoint has {c} classes)"


def _checkpoint_state(cfg: TrainConfig) -> dict | None:
    """The state dict the model starts from (read once), or None for random initialisation."""
    if cfg.weights is not None:
        return read_state_dict(cfg.weights)
    if cfg.pretrained:
        spec = get_spec(cfg.model)
        if spec.url is None:
            raise ValueError(f"model {cfg.model!r} has no official download; pass --weights PATH")
        return read_state_dict(download(spec.url, spec.sha256))
    return None


def _build_model(cfg: TrainConfig, train_ds: DatasetSplit, device: torch.device, main: bool, fresh: bool):
    """The model on ``device`` with its head: the checkpoint's, a new one, or (``head_init="probe"``,
    on a fresh start only: a resumed run reads its head from its checkpoint) the fitted probe."""
    start = _checkpoint_state(cfg)
    head_w = start.get("head.weight") if start is not None else None
    keep_head = False if cfg.head_init == "probe" else cfg.keep_head
    num_classes, kept, head_note = resolve_head(
        keep_head, cfg.num_classes, train_ds, int(head_w.shape[0]) if head_w is not None else None
    )
    if main and cfg.progress:
        how = " from the linear probe" if cfg.head_init == "probe" and fresh else ""
        print(f"renyiprune train: training {head_note}{how}", file=sys.stderr)
    torch.manual_seed(cfg.seed)
    model = create_model(
        cfg.model, weights=start, num_classes=num_classes, drop_path_rate=cfg.drop_path, **cfg.model_kwargs
    )
    if start is not None and head_w is not None and not kept and head_w.shape[0] == num_classes:
        model.reset_classifier(num_classes)  # a new head with the checkpoint's class count
    model = model.to(device)
    if cfg.head_init == "probe" and fresh:
        tf = eval_view(cfg.transform, model.pretrained_cfg).transform
        weights = weights_id(cfg.model, cfg.weights) if start is not None else None
        weights = weights or f"random:{cfg.seed}:{cfg.model_kwargs}"
        context = {"model": cfg.model, "weights": weights, "transform": repr(tf)}
        cache = FeatureCache(cfg.head_cache, context, "--head-cache") if cfg.head_cache is not None else None
        options = ProbeConfig(cache=cache, batch_size=cfg.batch_size, workers=cfg.workers, device=device,
                              progress=cfg.progress and main)  # fmt: skip
        head = probe_head(model, train_ds, tf, num_classes, options)
        init_head_from_probe(model, head)
    return model


@dataclass
class _Run:
    """A run in progress: its settings, what it trains (the unpatched ``model``, the pruning ``trainee``
    sharing its parameters, ``net``: the trainee or its DDP wrapper), the optimiser and the position."""

    cfg: TrainConfig
    dist: D.DistInfo
    model: nn.Module
    trainee: nn.Module
    net: nn.Module
    ema: nn.Module | None
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    sampler: DistributedSampler
    steps_per_epoch: int
    eval_ds: DatasetSplit
    images: AugmentedImages | None = None
    log: _Log | None = None
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    tally: EpochTally = field(default_factory=EpochTally)  # the epoch in progress
    last_eval: list[dict] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return torch.device(self.dist.device)

    @property
    def show(self) -> bool:
        return self.cfg.progress and self.dist.is_main


def _state(run: _Run) -> dict:
    """What a checkpoint holds: every state the run continues from, its position and its settings."""
    state = {
        "model": run.model.state_dict(),
        "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": rng_state(),
        "position": {"epoch": run.epoch, "step_in_epoch": run.step_in_epoch, "global_step": run.global_step},
        # the epoch in progress (none at an epoch's end: the finished one is logged before the next starts)
        "epoch_tally": (run.tally if run.step_in_epoch else EpochTally()).state(),
        "config": json.loads(json.dumps(asdict(run.cfg), default=str)),
        "world_size": run.dist.world_size,
    }
    if run.ema is not None:
        state["model_ema"] = run.ema.state_dict()
    return state


def _save(out: Path, state: dict) -> None:
    meta = {"model": state["config"]["model"], "global_step": str(state["position"]["global_step"])}
    save_weights(out / WEIGHTS, state["model"], meta)
    if "model_ema" in state:
        save_weights(out / "model_ema.safetensors", state["model_ema"], meta)
    save_checkpoint(out / CHECKPOINT, state)  # last: its presence means the weights above are as new


def train(cfg: TrainConfig, callback: Callable[[int, nn.Module, Tensor], None] | None = None) -> dict:
    """Run (or resume) a fine-tuning run; returns the last evaluation and the run's position.

    ``callback(global_step, module, loss)`` is called after each backward pass (gradients in place,
    already averaged across processes), before clipping and the optimiser step. ``cfg.out`` is locked
    for the run: a second process writing there stops with ``utils.io.OutputInUse``.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = D.init_distributed(cfg.device, cfg.dist_timeout)
    with output_lock(cfg.out, "--out", collective=True):  # rank 0's; every rank learns the outcome
        return _train(cfg, callback, dist)


def _restore(state: dict, cfg: TrainConfig, parts: tuple, ckpt_path: Path, main: bool) -> tuple:
    """Load a checkpoint into the run's (model, ema, optimizer, scheduler, scaler); returns the position
    (epoch, step in epoch, global step) and the tally of the epoch in progress. A larger ``cfg.epochs``
    than the checkpoint's extends the run: the schedule is the one over the new number of epochs, at the
    step reached (a finished run's LR rises from ``min_lr`` back onto that curve, as timm does)."""
    model, ema, opt, sched, scaler = parts
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if ema is not None and "model_ema" in state:
        ema.load_state_dict(state["model_ema"])
    set_rng_state(state["rng"])
    pos = state["position"]
    epoch, step_in_epoch, global_step = pos["epoch"], pos["step_in_epoch"], pos["global_step"]
    old_epochs = state["config"].get("epochs", cfg.epochs)
    where = f"epoch {epoch}/{old_epochs}" + (f" step {step_in_epoch}" if step_in_epoch else "")
    if cfg.epochs == old_epochs:
        sched.load_state_dict(state["scheduler"])
        say(f"resuming {ckpt_path} at {where}", main)
    else:
        before, now = extend_schedule(sched, state["scheduler"])
        say(f"resuming {ckpt_path} at {where} → extending to {cfg.epochs} epochs; the cosine schedule is "
            f"recomputed over {cfg.epochs} epochs from step {global_step} (lr {before:.3g} → {now:.3g})",
            main)  # fmt: skip
    return epoch, step_in_epoch, global_step, EpochTally.from_state(state.get("epoch_tally"))


def _check(cfg: TrainConfig, dist: D.DistInfo) -> dict | None:
    """Refuse bad settings, and an existing run without ``resume``; the checkpoint to resume, if any,
    checked against ``cfg`` before anything costly."""
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and not cfg.resume:  # every rank checks, so every rank stops
        raise ValueError(f"{ckpt_path} exists; pass --resume to continue it, or choose another --out")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"--amp must be none, bf16 or fp16, got {cfg.amp!r}")
    if cfg.transform not in TRANSFORMS:
        raise ValueError(f"--transform must be one of {', '.join(TRANSFORMS)}, got {cfg.transform!r}")
    if cfg.head_init not in HEAD_INITS:
        raise ValueError(f"--head-init must be one of {', '.join(HEAD_INITS)}, got {cfg.head_init!r}")
    if cfg.head_init == "probe" and cfg.keep_head:
        raise ValueError("--head-init probe fits a new head; it cannot be combined with --keep-head")
    resumed = load_checkpoint(ckpt_path) if cfg.resume and ckpt_path.is_file() else None
    if resumed is not None:  # before anything costly: a changed setting stops the run here
        check_resume(ckpt_path, resumed, cfg, dist.world_size)
    return resumed


def _splits(cfg: TrainConfig) -> tuple[DatasetSplit, DatasetSplit]:
    """The training split (its first ``limit`` images) and the evaluation split."""
    train_split = cfg.train_split or DEFAULT_SPLITS[cfg.dataset][0]
    eval_split = cfg.eval_split or DEFAULT_SPLITS[cfg.dataset][1]
    train_ds = load_split(cfg.dataset, cfg.data_root, train_split)
    eval_ds = load_split(cfg.dataset, cfg.data_root, eval_split)
    if cfg.limit:
        train_ds.samples = train_ds.samples[: cfg.limit]
    return train_ds, eval_ds


def _trainee(cfg: TrainConfig, model: nn.Module, dist: D.DistInfo) -> tuple[nn.Module, nn.Module]:
    """``model``'s prefix frozen, and the pruning copy that trains (sharing its parameters; ``model``
    stays unpatched for evaluation) with the module a step runs: that copy or its DDP wrapper."""
    frozen = freeze_prefix(model, cfg.freeze_blocks)  # shared with the trainee (and the EMA copy)
    trainee = share_parameters(model)
    if cfg.criterion != "none":
        apply(trainee, _plan(cfg, cfg.keep).plan)
    trainee.train()
    for m in frozen_modules(trainee, cfg.freeze_blocks):
        m.eval()  # a fixed feature extractor: no drop-path
    if frozen and dist.is_main and cfg.progress:
        print(f"renyiprune train: {len(frozen)} parameter tensors frozen (embeddings, blocks "
              f"0-{cfg.freeze_blocks - 1})", file=sys.stderr)  # fmt: skip
    net = trainee
    if dist.enabled:
        device = torch.device(dist.device)
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(trainee, device_ids=ids)
    return trainee, net


def _optimiser(cfg: TrainConfig, model: nn.Module, images: int, dist: D.DistInfo) -> tuple:
    """AdamW (lr scaled by the global batch), its warm-up + cosine schedule, the gradient scaler, the
    sampler over ``images`` training images and the steps per epoch."""
    global_batch = cfg.batch_size * dist.world_size
    lr = cfg.lr * global_batch / 512 if cfg.lr_scale else cfg.lr
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=lr)
    # drop_last: K processes x batch B take exactly the images one process takes with batch K x B
    # (no padding with repeated images; the tail that fills no global batch is dropped either way).
    sampler = DistributedSampler(range(images), dist.world_size, dist.rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)  # fmt: skip
    steps_per_epoch = len(sampler) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"{len(sampler)} training images per process is less than one batch of {cfg.batch_size}"
        )
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    scale = WarmupCosine(lr, cfg.warmup_lr, cfg.min_lr, warmup_steps, cfg.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, scale)
    cuda = torch.device(dist.device).type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and cfg.amp == "fp16")
    return opt, sched, scaler, sampler, steps_per_epoch


def _setup(cfg: TrainConfig, dist: D.DistInfo) -> _Run:
    """A run ready to train: data, model, trainee, optimiser, log and training images, at the position
    of its checkpoint when it resumes."""
    resumed = _check(cfg, dist)
    train_ds, eval_ds = _splits(cfg)
    model = _build_model(cfg, train_ds, torch.device(dist.device), dist.is_main, fresh=resumed is None)
    ema = copy.deepcopy(model) if cfg.ema_decay > 0 else None
    trainee, net = _trainee(cfg, model, dist)
    opt, sched, scaler, sampler, steps = _optimiser(cfg, model, len(train_ds.samples), dist)
    run = _Run(cfg, dist, model, trainee, net, ema, opt, sched, scaler, sampler, steps, eval_ds)
    if resumed is not None:
        parts = (model, ema, opt, sched, scaler)
        position = _restore(resumed, cfg, parts, Path(cfg.out) / CHECKPOINT, dist.is_main)
        run.epoch, run.step_in_epoch, run.global_step, run.tally = position
    run.log = _Log(Path(cfg.out), dist.is_main, run.global_step if cfg.resume else None)
    transform = train_transform(
        cfg.transform, model.pretrained_cfg, crop_scale=cfg.crop_scale, randaug_n=cfg.randaug_n,
        randaug_m=cfg.randaug_m, reprob=cfg.reprob, train_crop=cfg.train_crop,
    )  # fmt: skip
    run.images = AugmentedImages(train_ds, transform, cfg.seed)
    return run


def _loss(run: _Run, batch) -> tuple[Tensor, float, int]:
    """The loss on ``batch`` (mixup/cutmix, autocast; randomness from seed, step and rank), and its value
    and the skipped images over all processes (every rank sees a NaN anywhere and stops)."""
    cfg, device = run.cfg, run.device
    skipped = readable(batch, cfg.skip_bad, run.global_step)
    x, y = batch.images, batch.labels
    torch.manual_seed(_seed_of(cfg.seed, run.global_step, run.dist.rank))  # drop-path etc.
    rng = np.random.default_rng(_seed_of(cfg.seed, run.global_step, run.dist.rank, 1))  # mixup/cutmix
    x, y = x.to(device, non_blocking=True), y.to(device)
    target = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        x, target = mixup_cutmix(
            x, y, run.model.num_classes, rng, cfg.mixup, cfg.cutmix, cfg.mixup_switch_prob, cfg.smoothing
        )
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    amp = device.type == "cuda" and amp_dtype is not None
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
        logits = run.net(x)
    if target is not None:
        loss = soft_target_cross_entropy(logits, target)
    else:
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.smoothing)
    loss_all, skipped = reduce_step(loss, skipped)
    if not math.isfinite(loss_all):
        raise FloatingPointError(f"loss is {loss_all} at step {run.global_step}; stopping")
    return loss, loss_all, skipped


def _step(run: _Run, batch, callback: Callable | None, t_step: float) -> float:
    """One optimiser step on ``batch`` (EMA, position and tally updated, the step logged; ``t_step``:
    when its batch started loading); returns the loss over all processes."""
    loss, loss_all, skipped = _loss(run, batch)
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if callback is not None:
        callback(run.global_step, run.trainee, loss.detach())
    run.scaler.unscale_(run.opt)
    grad_norm = nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.clip_grad or float("inf"))
    run.scaler.step(run.opt)
    run.scaler.update()
    run.sched.step()
    if run.ema is not None:
        with torch.no_grad():
            for pe, pm in zip(run.ema.parameters(), run.model.parameters(), strict=True):
                pe.lerp_(pm, 1.0 - run.cfg.ema_decay)
    run.global_step += 1
    run.step_in_epoch += 1
    run.tally.add(loss_all, skipped)
    run.log.write(
        {
            "kind": "step",
            "epoch": run.epoch,
            "step": run.step_in_epoch,
            "global_step": run.global_step,
            "loss": loss_all,
            "lr": run.opt.param_groups[0]["lr"],
            "grad_norm": float(grad_norm),
            "seconds": time.perf_counter() - t_step,  # this step, its batch's loading included
        }
    )
    return loss_all


def _run_eval(run: _Run, ep: int, train_loss: float | None, skipped: int | None = None) -> None:
    """Evaluate unpruned and pruned (every rank its share; counts all-reduced); rank 0 logs it."""
    t0 = time.perf_counter()
    run.last_eval = _evaluate(run.model, run.cfg, run.eval_ds, run.dist, run.show)
    if not run.dist.is_main:
        return
    run.log.write({"kind": "eval", "epoch": ep, "global_step": run.global_step, "train_loss": train_loss,
                   "train_skipped": skipped, "eval_seconds": time.perf_counter() - t0,
                   "results": run.last_eval})  # fmt: skip
    if run.show:
        summary = ", ".join(f"{r['config']}: {r['top1']:.2f}%" for r in run.last_eval)
        print(f"renyiprune train: epoch {ep} top-1 {summary}", file=sys.stderr)


def _checkpoint(run: _Run, at_end: bool, stop: bool) -> None:
    """Rank 0 saves a checkpoint at an epoch's end, at a stop and every ``save_every`` steps."""
    every = run.cfg.save_every and run.global_step % run.cfg.save_every == 0
    if run.dist.is_main and (at_end or stop or every):
        _save(Path(run.cfg.out), _state(run))


def _end_epoch(run: _Run, seconds: float) -> None:
    """Log and report the epoch just finished, evaluate when one is due, and start a new tally."""
    cfg = run.cfg
    run.log.write(run.tally.record(run.epoch, run.global_step, seconds))
    run.tally.report(run.epoch, run.dist.is_main)
    if cfg.eval_every and (run.epoch % cfg.eval_every == 0 or run.epoch == cfg.epochs):
        _run_eval(run, run.epoch, run.tally.mean_loss, run.tally.skipped)
    run.tally = EpochTally()


def _epoch(run: _Run, callback: Callable | None) -> bool:
    """Train the rest of the current epoch (from ``step_in_epoch``); True when ``max_steps`` stopped it."""
    cfg = run.cfg
    run.sampler.set_epoch(run.epoch)
    order = list(run.sampler)
    batches = [order[i * cfg.batch_size : (i + 1) * cfg.batch_size] for i in range(run.steps_per_epoch)]
    run.images.epoch = run.epoch
    loader = DataLoader(run.images, batch_sampler=batches[run.step_in_epoch :], num_workers=cfg.workers,
                        collate_fn=collate)  # fmt: skip
    desc = f"epoch {run.epoch + 1}/{cfg.epochs}"
    bar = tqdm(total=run.steps_per_epoch, initial=run.step_in_epoch, desc=desc, disable=not run.show,
               file=sys.stderr, unit="step")  # fmt: skip
    t_epoch = t_step = time.perf_counter()
    stop = False
    for batch in loader:
        loss = _step(run, batch, callback, t_step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        at_end = run.step_in_epoch == run.steps_per_epoch
        stop = cfg.max_steps is not None and run.global_step >= cfg.max_steps
        if at_end:
            run.epoch, run.step_in_epoch = run.epoch + 1, 0
        _checkpoint(run, at_end, stop)
        t_step = time.perf_counter()
        if stop:
            break
    bar.close()
    if run.tally.steps and run.step_in_epoch == 0:  # an epoch finished (its steps before a resume included)
        _end_epoch(run, time.perf_counter() - t_epoch)
    return stop


def _train(cfg: TrainConfig, callback: Callable | None, dist: D.DistInfo) -> dict:
    """Set the run up, evaluate before the first step, train epoch by epoch; the last evaluation and
    the position reached."""
    run = _setup(cfg, dist)
    if cfg.eval_before and run.global_step == 0 and cfg.eval_every:
        _run_eval(run, 0, None)
    stop = cfg.max_steps is not None and run.global_step >= cfg.max_steps  # already there: no step
    while run.epoch < cfg.epochs and not stop:
        stop = _epoch(run, callback)
    if stop and run.epoch < cfg.epochs:
        say(f"stopped after {run.global_step} steps (--max-steps); resume with --resume", dist.is_main)
    if dist.enabled:
        torch.distributed.barrier()
    return {"epoch": run.epoch, "step_in_epoch": run.step_in_epoch, "global_step": run.global_step,
            "eval": run.last_eval}  # fmt: skip
