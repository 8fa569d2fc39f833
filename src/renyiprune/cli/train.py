"""``renyiprune train``: fine-tune a ViT with token pruning active (EViT recipe); torchrun for several."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..core.criteria import list_criteria, make_criterion, takes_alpha
from ..data.datasets import DATASETS
from ..models.model import get_spec
from ..models.weights import read_state_dict
from ..planning.specs import split_criterion
from ..training.head_init import HEAD_INITS
from ..training.train import TrainConfig, train
from ..training.transforms import TRANSFORMS
from ..utils.distributed import DEFAULT_TIMEOUT_S, TIMEOUT_ENV
from . import common


def _optional_float(text: str) -> float | None:
    """'none', '0' or '': off; otherwise a finite number > 0."""
    if text.strip().lower() in ("", "none", "0"):
        return None
    return common.real(0, open_low=True)(text)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune with pruning in the loop (EViT recipe), resumable, torchrun for several processes",
        description="Fine-tune MODEL on a data set with token pruning active. Writes OUT/last.pt (full "
        "state, atomic, each epoch and every --save-every steps), OUT/model.safetensors (weights for eval "
        "--weights), OUT/metrics.jsonl and OUT/metrics.csv. Run several processes with "
        "torchrun --nproc_per_node K -m renyiprune train ... (--batch-size is per process).",
    )
    common.add_model_args(p)
    _add_data_args(p)
    _add_pruning_args(p.add_argument_group("pruning while training"))
    _add_cost_args(p.add_argument_group("cost and input"))
    _add_recipe_args(p.add_argument_group("recipe (EViT/DeiT fine-tuning defaults)"))
    _add_operations_args(p.add_argument_group("operations"))
    p.set_defaults(run=run)


def _add_data_args(p) -> None:
    """The data, the run folder and the classifier head."""
    p.add_argument("--dataset", choices=DATASETS, default="imagefolder", help="on-disk layout of --data-root")
    p.add_argument("--data-root", type=common.existing_dir, required=True)
    p.add_argument("--out", type=common.output_path, required=True, help="run folder (checkpoints, metrics)")
    p.add_argument("--train-split", default=None, help="default: trainval (flowers, aircraft) or train")
    p.add_argument("--eval-split", default=None, help="default: test (flowers, aircraft) or val")
    p.add_argument("--num-classes", type=common.integer(1), default=None,
                   help="default: the data set's class count")
    p.add_argument(
        "--keep-head",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the checkpoint's classifier (labels are its class indices; an error when they "
        "cannot be). Default: kept when the data has the checkpoint's class count or its "
        "labels.tsv names ImageNet-1k's classes; --no-keep-head always starts a new head",
    )
    p.add_argument(
        "--head-init",
        choices=HEAD_INITS,
        default="new",
        help="probe: start the new head from the linear probe of the unpruned model on the training "
        "split (logistic regression on its final CLS features, evaluation transform); new: random",
    )
    p.add_argument(
        "--head-cache",
        type=common.output_path,
        default=None,
        help="folder keeping --head-init probe's features and head (a probe --cache folder)",
    )
    p.add_argument("--limit", type=common.integer(1), default=None,
                   help="use the first N images of each split")


def _add_pruning_args(g) -> None:
    """The pruning the model trains with, and the keep rates it is evaluated at."""
    g.add_argument("--keep", type=common.keep_rate, default=0.7)
    g.add_argument("--criterion", default="renyi",
                   help=f"none or one of {', '.join(list_criteria())}; options in brackets: "
                   "renyi[cls_key=exclude;heads=pooled]")  # fmt: skip
    g.add_argument("--alpha", type=common.alpha, default=2.0)
    g.add_argument("--locations", type=common.locations, default=(3, 6, 9))
    g.add_argument("--fuse", action="store_true", help="fuse pruned tokens into one extra token")
    g.add_argument("--eval-keep", type=common.keep_rates, default=[0.5, 0.7, 0.9],
                   help="keep rates evaluated after each epoch (plus the unpruned model)")  # fmt: skip


def _add_cost_args(g) -> None:
    """Frozen blocks and the training view: the cost levers."""
    g.add_argument(
        "--freeze-blocks",
        type=common.integer(0),
        default=0,
        metavar="N",
        help="keep the patch/position embedding, CLS token and blocks 0..N-1 fixed, run without autograd "
        "(N = the first pruning location skips the backward pass over the unpruned blocks); 0: train all",
    )
    g.add_argument(
        "--transform",
        choices=TRANSFORMS,
        default="center-crop",
        help="center-crop: DeiT's random-resized crop for training, shorter side + center crop for "
        "evaluation; resize: the whole image squashed to the input size (a random box of it for "
        "training), for objects that fill a wide frame (cars)",
    )
    g.add_argument(
        "--crop-scale",
        type=common.real(0, 1, open_low=True),
        default=0.08,
        metavar="S",
        help="smallest share of the image area a training crop covers (1: the whole image)",
    )


def _add_recipe_args(g) -> None:
    """Schedule, optimiser and regularisation (EViT/DeiT fine-tuning defaults)."""
    g.add_argument("--epochs", type=common.integer(1), default=30)
    g.add_argument("--batch-size", type=common.integer(1), default=64, help="per process")
    g.add_argument("--lr", type=common.real(0, open_low=True), default=2e-5,
                   help="for a global batch of 512 (see --no-lr-scale)")
    g.add_argument("--no-lr-scale", action="store_true", help="use --lr as given, not lr * batch / 512")
    g.add_argument("--min-lr", type=common.real(0), default=2e-6)
    g.add_argument("--warmup-lr", type=common.real(0), default=1e-6)
    g.add_argument("--warmup-epochs", type=common.real(0), default=5.0)
    g.add_argument("--weight-decay", type=common.real(0), default=1e-6)
    g.add_argument("--clip-grad", type=_optional_float, default=None, help="max gradient norm (off)")
    g.add_argument("--smoothing", type=common.real(0, 1, open_high=True), default=0.1)
    g.add_argument("--mixup", type=common.real(0), default=0.8, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=common.real(0), default=1.0, help="cutmix alpha (0: off)")
    g.add_argument("--randaug-n", type=common.integer(0), default=2, help="RandAugment operations (0: off)")
    g.add_argument("--randaug-m", type=common.real(0, 10), default=9.0,
                   help="RandAugment magnitude out of 10")
    g.add_argument("--reprob", type=common.real(0, 1), default=0.25, help="random erasing probability")
    g.add_argument("--drop-path", type=common.real(0, 1, open_high=True), default=0.1)
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="mixed precision (CUDA)")
    g.add_argument("--ema-decay", type=common.real(0, 1, open_high=True), default=0.0,
                   help="keep an EMA of the weights (0: off)")


def _add_operations_args(g) -> None:
    """Checkpoints, stopping, evaluation, resuming, seeds, workers and timeouts."""
    g.add_argument("--save-every", type=common.integer(0), default=0, help="also checkpoint every N steps")
    g.add_argument("--max-steps", type=common.integer(1), default=None,
                   help="stop (with a checkpoint) after N steps in total; continue with --resume")
    g.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable training (and evaluation) images, counted per epoch, instead of "
                   "stopping at the first")  # fmt: skip
    g.add_argument("--eval-every", type=common.integer(0), default=1,
                   help="evaluate every N epochs (0: never)")
    g.add_argument("--no-eval-before", action="store_true", help="skip the evaluation before training")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue OUT/last.pt exactly (refused when a setting differs from the checkpoint's; a larger "
        "--epochs extends the run, the cosine schedule recomputed over the new length)",
    )
    g.add_argument("--seed", type=common.integer(0, 2**32 - 1), default=0)
    g.add_argument("--workers", type=common.integer(0), default=2, help="DataLoader worker processes")
    g.add_argument(
        "--dist-timeout",
        type=common.real(0, open_low=True),
        default=None,
        help="torchrun: seconds a collective waits for the other processes before it fails "
        f"(default: ${TIMEOUT_ENV} or {DEFAULT_TIMEOUT_S:.0f})",
    )
    g.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    # ranges (epochs, batch size, crop scale, frozen blocks, timeout) are checked by the parser's types
    with common.naming("--criterion", args.criterion):
        crit, opts = split_criterion(args.criterion)
        if "alpha" in opts:
            raise ValueError("train takes the Rényi order from --alpha")
        if crit != "none" and crit not in list_criteria():
            raise ValueError(f"unknown criterion {crit!r}; choose none or {', '.join(list_criteria())}")
        if crit != "none":
            make_criterion(crit, **({"alpha": args.alpha} if takes_alpha(crit, opts) else {}), **opts)
    return TrainConfig(
        data_root=str(args.data_root), out=str(args.out), dataset=args.dataset, model=args.model,
        weights=str(args.weights) if args.weights else None, pretrained=args.weights is None,
        train_split=args.train_split, eval_split=args.eval_split, num_classes=args.num_classes,
        keep_head=args.keep_head, head_init=args.head_init,
        head_cache=str(args.head_cache) if args.head_cache else None, freeze_blocks=args.freeze_blocks,
        transform=args.transform, crop_scale=args.crop_scale,
        limit=args.limit, keep=args.keep, criterion=args.criterion, alpha=args.alpha,
        locations=tuple(args.locations), fuse=args.fuse, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, lr_scale=not args.no_lr_scale, min_lr=args.min_lr, warmup_lr=args.warmup_lr,
        warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
        smoothing=args.smoothing, mixup=args.mixup, cutmix=args.cutmix, randaug_n=args.randaug_n,
        randaug_m=args.randaug_m, reprob=args.reprob, drop_path=args.drop_path, amp=args.amp,
        ema_decay=args.ema_decay, eval_keep=tuple(args.eval_keep), eval_before=not args.no_eval_before,
        eval_every=args.eval_every, save_every=args.save_every, max_steps=args.max_steps, seed=args.seed,
        skip_bad=args.skip_bad,
        workers=args.workers, device=args.device, threads=args.threads, resume=args.resume,
        progress=not args.no_progress, dist_timeout=args.dist_timeout,
    )  # fmt: skip


def check_before_out(args: argparse.Namespace) -> None:
    """What ``train`` would find wrong only after creating --out: weights that do not read, --locations
    beyond the model's blocks."""
    depth = int(get_spec(args.model).kwargs.get("depth", 12))
    if any(i >= depth for i in args.locations):
        raise ValueError(f"--locations {args.locations} out of range for {args.model} ({depth} blocks, "
                         "0-based)")
    if args.weights is not None:
        read_state_dict(args.weights)  # WeightsError names the file


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    check_before_out(args)
    try:
        result = train(cfg)
    finally:
        from ..utils.distributed import cleanup

        cleanup()
    if result["eval"] and os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        rows = [
            [r["config"], f"{r['top1']:.2f}", f"{r['top5']:.2f}", f"{r['gmacs']:.3f}"] for r in result["eval"]
        ]
        print(f"after {result['global_step']} steps; weights in {Path(cfg.out) / 'model.safetensors'}")
        print(common.format_table(["config", "top-1 %", "top-5 %", "GMACs"], rows))
    return 0
