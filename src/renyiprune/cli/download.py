"""``renyiprune download``: fetch a training data set in its official layout, checksum-verified and atomic."""

from __future__ import annotations

import argparse

from ..data.datasets import DOWNLOADS, NAMED_DATASETS, download_dataset
from . import common


def help_line() -> str:
    """The one-line help: every named data set of ``data.datasets``, which of them are fetched."""
    fetched = [d for d in NAMED_DATASETS if d in DOWNLOADS]
    placed = [d for d in NAMED_DATASETS if d not in DOWNLOADS]
    return (f"download a data set into DIR: {', '.join(fetched)} (MD5-verified); {', '.join(placed)}: "
            "says where to place the files")  # fmt: skip


def add_parser(sub) -> None:
    p = sub.add_parser(
        "download",
        help=help_line(),
        description="Download and unpack a data set in its official layout for train --data-root DIR. "
        "Files are verified against their published MD5 before they are kept. ImageNet-100 (ImageNet needs "
        "an account) and Stanford Cars (its official links are gone) cannot be downloaded; the command says "
        "where to place their files.",
    )
    p.add_argument("dataset", choices=NAMED_DATASETS, help=help_line())
    p.add_argument("--root", type=common.output_path, required=True,
                   help="folder to download into (--data-root later)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.root.exists() and not args.root.is_dir():
        raise NotADirectoryError(f"--root {args.root} is a file, not a folder")
    root = download_dataset(args.dataset, args.root, progress=not args.no_progress)
    print(f"{args.dataset} is ready in {root}; train with --dataset {args.dataset} --data-root {root}")
    return 0
