"""The flags ``sweep``, ``tune-alpha`` and ``tune-budget`` share (model, images, the grid), their checks,
and the ``experiments.runs.ImageRun`` they name."""

from __future__ import annotations

import argparse

from ..experiments.grid import Grid
from ..experiments.runs import ImageRun, check_model
from ..experiments.sweep import SweepSettings
from ..utils import distributed as D
from . import common


def _on_off(text: str) -> list[bool]:
    vals = {"off": False, "on": True, "false": False, "true": True, "0": False, "1": True}
    out = []
    for t in text.split(","):
        if t.strip().lower() not in vals:
            raise argparse.ArgumentTypeError(f"expected off,on; got {t!r}")
        out.append(vals[t.strip().lower()])
    return list(dict.fromkeys(out))


def add_image_args(p: argparse.ArgumentParser) -> None:
    """Model, images and pruning locations: what sweep, tune-alpha and tune-budget all take."""
    common.add_model_args(p)
    common.add_data_args(p)
    p.add_argument("--locations", type=common.locations, default=(3, 6, 9), help="0-based pruning blocks")
    p.add_argument("--limit", type=common.integer(1), default=None, help="first N images in listing order")
    p.add_argument("--batch-size", type=common.integer(1), default=64)
    p.add_argument("--workers", type=common.integer(0), default=2,
                   help="DataLoader worker processes (decoding)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")
    p.add_argument("--no-progress", action="store_true")


def add_grid_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by sweep and tune-alpha: the images and the grid of keep rates, α, λ, fusion."""
    add_image_args(p)
    p.add_argument("--keep", type=common.keep_rates, default=[0.5, 0.6, 0.7, 0.8, 0.9],
                   help="keep rate(s) in (0, 1]")
    p.add_argument("--alpha", type=common.alphas, default=[0.5, 1.0, 2.0, 3.0, float("inf")],
                   help="Rényi order(s) of the criteria that take one, e.g. 1,2,inf")
    common.add_old_spelling(p, "--alphas", "alpha", type=common.alphas)
    lambdas = common._typed(common._list(common.real(0, 1)), "lambdas")
    p.add_argument("--lambda", dest="lambdas", metavar="LAMBDA", type=lambdas, default=[0.5],
                   help="hybrid: weight(s) of EViT's CLS attention, in [0, 1]")
    common.add_old_spelling(p, "--lambdas", "lambdas", type=lambdas)
    p.add_argument("--fuse", type=_on_off, nargs="?", const=[True], default=[False],
                   help="off, on or off,on (alone: on)")


def grid_of(args: argparse.Namespace) -> Grid:
    """The values the grid flags cross (``--keep``, ``--alpha``, ``--lambda``, ``--fuse``, ``--locations``,
    ``--budget``)."""
    return Grid(keep=tuple(args.keep), alpha=tuple(args.alpha), lambdas=tuple(args.lambdas),
                fuse=tuple(args.fuse), locations=tuple(args.locations),
                budget=tuple(getattr(args, "budget", None) or ()))  # fmt: skip


def check_image_args(args) -> None:
    policy_out = getattr(args, "policy_out", None)  # tune-alpha, tune-budget: written last, checked first
    if policy_out is not None and policy_out.is_dir():
        raise IsADirectoryError(f"--policy-out {policy_out} is a folder; give the policy file's name")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")


def check_args(args) -> None:
    check_image_args(args)
    if any(not 0.0 <= lam <= 1.0 for lam in args.lambdas):
        raise ValueError("--lambda must be in [0, 1]")


def image_source(args: argparse.Namespace) -> common.ImageSource:
    """The images the data flags name (``common.read_images``), read once and kept as ``args.source``: the
    fingerprint and the bottom crop of every ``sweep`` call of a command come from it."""
    if getattr(args, "source", None) is None:
        args.source = common.read_images(args)
    return args.source


def read_source(args: argparse.Namespace) -> list:
    """The samples of :func:`image_source`."""
    return image_source(args).samples


def load_checked_model(args: argparse.Namespace, samples: list):
    """``common.load_model``, after which every label of ``samples`` must be a class of its head and every
    ``--locations`` block one of its blocks (``runs.check_model``)."""
    model = common.load_model(args)
    check_model(model, samples, args.locations, args.model)
    return model


def image_run(args: argparse.Namespace, model) -> ImageRun:
    """The ``ImageRun`` the flags name for ``model``: weights, image source and settings."""
    source = image_source(args)
    progress = not args.no_progress and D.rank() == 0
    settings = SweepSettings(batch_size=args.batch_size, workers=args.workers, device=args.device,
                             skip_bad=args.skip_bad, progress=progress)  # fmt: skip
    return ImageRun(model, args.model, args.weights, source.key, source.crop_bottom, settings)
