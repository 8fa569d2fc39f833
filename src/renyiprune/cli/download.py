"""``renyiprune download``: fetch a training data set in its official layout, checksum-verified and atomic."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.datasets import DOWNLOADS, download_dataset


def add_parser(sub) -> None:
    p = sub.add_parser(
        "download",
        help="download a data set (flowers102, fgvc-aircraft) into DIR, MD5-verified",
        description="Download and unpack a data set in its official layout for train --data-root DIR. "
        "Files are verified against their published MD5 before they are kept. ImageNet-100 (ImageNet needs "
        "an account) and Stanford Cars (its official links are gone) cannot be downloaded; the command says "
        "where to place their files.",
    )
    p.add_argument("dataset", choices=[*DOWNLOADS, "imagenet100", "stanford-cars"])
    p.add_argument("--root", type=Path, required=True, help="folder to download into (--data-root later)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    root = download_dataset(args.dataset, args.root, progress=not args.no_progress)
    print(f"{args.dataset} is ready in {root}; train with --dataset {args.dataset} --data-root {root}")
    return 0
