"""``renyiprune probe``: linear probe of a frozen, pruned ViT on a new label set (fine-grained data).

The pruning configurations use ``eval``'s grammar (``add_config_args`` and ``configs_from_args``):
criteria x --alpha x --keep, --fuse / --removed, --budget, --criterion best with --policy, none, tome.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..data.datasets import NAMED_DATASETS, TRANSFORMS, eval_transform, load_split
from ..data.images import list_samples
from ..experiments.probe import DEFAULT_L2_GRID, HEADS, FeatureCache, ImageSet, ProbeConfig, run_probe
from ..models.model import weights_id
from . import common
from . import eval as eval_cmd

DEFAULT_TRANSFORM = "resize"
_REPO = Path(__file__).resolve().parents[3]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "probe",
        help="linear probe under pruning: logistic-regression head on pruned CLS features, top-1/top-5",
        description="Run the frozen model's pruned forward on --train and --eval images, fit a multinomial "
        "logistic-regression head on the final CLS features of --train (L2 strength chosen on a held-out "
        "fifth of --train, then refitted on all of it) and report top-1/top-5 and GMACs on each --eval set, "
        "with paired 95 % intervals against the unpruned probe and against EViT at the same keep rate. "
        "Images are decoded once and the blocks before the first pruning location run once per image.",
    )
    common.add_model_args(p)
    eval_cmd.add_config_args(p)
    p.add_argument("--train", required=True, help="training images: a labels.tsv/ImageFolder folder, or a "
                   "split name with --dataset")  # fmt: skip
    p.add_argument("--eval", nargs="+", default=None, help="evaluation folder(s) (or split names)")
    p.add_argument("--split", default=None,
                   help="with --dataset: an evaluation split, as the other commands name it (= --eval SPLIT)")
    p.add_argument("--dataset", choices=["folder", *NAMED_DATASETS], default="folder",
                   help="folder: --train/--eval are folders; otherwise a named layout under --data-root")
    p.add_argument("--data-root", type=common.existing_dir, default=None, help="root of --dataset")
    p.add_argument("--transform", choices=TRANSFORMS, default=DEFAULT_TRANSFORM,
                   help="resize: the whole image to the input size; center-crop: the model's ImageNet one")
    p.add_argument("--head", choices=HEADS, default="per-config",
                   help="per-config: a head fitted on each configuration's own pruned --train features; "
                   "unpruned: one head fitted on the unpruned features, pruning at inference only (cheaper: "
                   "--train runs unpruned only)")
    p.add_argument("--cache", type=common.output_path, default=None,
                   help="folder keeping features between runs")
    l2_values = common._typed(common._list(common.real(0, open_low=True)), "l2 values")
    p.add_argument("--l2", type=l2_values, default=list(DEFAULT_L2_GRID),
                   help="L2 strength(s) of the head; several: chosen on a held-out fifth of --train")
    p.add_argument("--limit", type=common.integer(1), default=None, help="first N images of every set")
    p.add_argument("--batch-size", type=common.integer(1), default=64)
    p.add_argument("--workers", type=common.integer(0), default=1,
                   help="DataLoader worker processes (decoding)")
    p.add_argument("--json", action="store_true", help='print {"results": [...]} on stdout')
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def default_weights(model: str) -> Path | None:
    """The repository's demo weights for ``model`` when they are there (no download needed)."""
    p = _REPO / "demo" / "weights" / f"{model}.safetensors"
    return p if p.is_file() else None


def _image_sets(args: argparse.Namespace) -> tuple[ImageSet, list[ImageSet], int | None]:
    def limited(samples):
        return tuple(samples[: args.limit] if args.limit else samples)

    if args.dataset == "folder":
        if args.data_root is not None or args.split is not None:
            flag = "--data-root" if args.data_root is not None else "--split"
            raise ValueError(f"{flag} goes with --dataset NAME; with folders pass them to --train/--eval")
        for d in [args.train, *args.eval]:
            if not Path(d).is_dir():
                raise NotADirectoryError(f"{d}: not a directory (a labels.tsv or ImageFolder folder)")
        train = ImageSet(str(args.train), limited(list_samples(args.train)))
        return train, [ImageSet(str(e), limited(list_samples(e))) for e in args.eval], None
    if args.data_root is None:
        raise ValueError(f"--dataset {args.dataset} needs --data-root")
    evals = list(dict.fromkeys([*(args.eval or []), *([args.split] if args.split else [])]))
    splits = [load_split(args.dataset, args.data_root, s) for s in [args.train, *evals]]
    sets = [ImageSet(s.split, limited(s.samples), s.crop_bottom) for s in splits]
    return sets[0], sets[1:], splits[0].num_classes


def check_args(args: argparse.Namespace) -> None:
    for flag, values in (("--train", [args.train]), ("--eval", args.eval or [])):
        if any(not str(v).strip() for v in values):  # '' would be the current folder
            raise ValueError(f"{flag} needs a folder (or, with --dataset, a split name); got ''")
    if not args.eval and args.split is None:
        raise ValueError("give --eval FOLDER... (or, with --dataset, --eval SPLIT... or --split SPLIT)")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if not args.l2 or any(not v > 0 for v in args.l2):
        raise ValueError("--l2 values must be > 0")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    configs = eval_cmd.configs_from_args(args)
    train, evals, num_classes = _image_sets(args)
    if args.weights is None:
        args.weights = default_weights(args.model)
    model = common.load_model(args)
    if any(i >= len(model.blocks) for i in args.locations):
        raise ValueError(f"--locations {args.locations} out of range ({len(model.blocks)} blocks, 0-based)")
    transform = eval_transform(args.transform, model.pretrained_cfg)
    cache = None
    if args.cache is not None:
        context = {"model": args.model, "weights": weights_id(args.model, args.weights),
                   "transform": repr(transform)}  # fmt: skip
        cache = FeatureCache(args.cache, context)
    t0 = time.perf_counter()
    options = ProbeConfig(num_classes=num_classes, cache=cache, l2_grid=args.l2, batch_size=args.batch_size,
                          workers=args.workers, device=args.device, progress=not args.no_progress,
                          head=args.head)  # fmt: skip
    records, timing = run_probe(model, configs, train, list(evals), transform, options)
    timing["wall_s"] = time.perf_counter() - t0
    if args.json:
        common.print_json({"results": records, "train_images": len(train.samples), "timing": timing})
        return 0
    print_tables(records, args.model, len(train.samples), timing)
    return 0


def _diff(d: dict | None) -> str:
    if d is None:
        return "-"
    lo, hi = d["ci95"]
    return f"{d['delta']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def print_tables(records: list[dict], model: str, train_images: int, timing: dict) -> None:
    headers = ["config", "top-1 %", "top-5 %", "GMACs", "l2", "Δ vs unpruned [95 % CI]",
               "Δ vs EViT [95 % CI]"]
    for name in dict.fromkeys(r["eval"] for r in records):
        rows = [[r["config"] + (" (ref)" if r["reference"] else ""), f"{r['top1']:.2f}", f"{r['top5']:.2f}",
                 f"{r['gmacs']:.3f}", f"{r['l2']:g}", _diff(r["vs_unpruned"]), _diff(r["vs_evit"])]
                for r in records if r["eval"] == name]  # fmt: skip
        n = next(r["images"] for r in records if r["eval"] == name)
        head = next(r["head"] for r in records if r["eval"] == name)
        print(f"{model} linear probe ({head} head): fitted on {train_images} images, evaluated on {name} "
              f"({n} images)")
        print(common.format_table(headers, rows))
    print(
        f"decode + prefix {timing['decode_prefix_s']:.1f} s, features {timing['features_s']:.1f} s, heads "
        f"{timing['heads_s']:.1f} s, {timing['cached']} feature sets from the cache; "
        f"total {timing['wall_s']:.1f} s"
    )
    sys.stdout.flush()


def load_results(path: str | Path) -> list[dict]:
    """The records of a ``probe --json`` output file."""
    return json.loads(Path(path).read_text())["results"]
