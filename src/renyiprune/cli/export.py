"""``renyiprune export``: a pruned model with a fixed keep rate as one ONNX file (dynamic batch)."""

from __future__ import annotations

import argparse

import torch

from ..api import patch
from ..core.criteria import list_criteria
from ..core.entropy import parse_alpha
from . import common


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a pruned model (fixed keep rate) to ONNX, checked against torch with onnxruntime",
        description="Patch MODEL with one pruning configuration and export it with torch.onnx (dynamic "
        "batch, static token counts). With --check the file is run with onnxruntime on random images and "
        "compared with torch. Needs pip install 'renyiprune[export]'.",
    )
    common.add_model_args(p)
    p.add_argument("--onnx", type=common.output_path, required=True, metavar="FILE", help="output .onnx file")
    p.add_argument("--criterion", default="renyi",
                   help=f"none, best (the tuned policy's choice for --keep) or {', '.join(list_criteria())}; "
                   "options in brackets: renyi[cls_key=exclude;heads=pooled]")
    p.add_argument("--alpha", type=common.alpha, default=2.0, help="Rényi order")
    p.add_argument("--keep", type=common.keep_rate, default=0.7, help="keep rate in (0, 1]")
    p.add_argument("--locations", type=common.locations, default=(3, 6, 9), help="0-based pruning blocks")
    p.add_argument("--fuse", action="store_true", help="fuse pruned tokens into one extra token")
    p.add_argument("--check", action="store_true", help="compare onnxruntime with torch (max |diff|)")
    p.add_argument("--tolerance", type=common.real(0), default=1e-4,
                   help="--check fails above this difference")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..models.export import export_onnx, onnx_max_difference

    crit, options = common.criterion_spec(args.criterion)  # 'renyi[cls_key=exclude]'
    if crit not in ("none", "best") and crit not in list_criteria():
        raise ValueError(f"--criterion {args.criterion!r}: unknown criterion {crit!r}; choose none, best or "
                         f"{', '.join(list_criteria())}")
    if crit in ("none", "best") and options:
        raise ValueError(f"--criterion {args.criterion!r}: criterion {crit} takes no options in brackets")
    alpha = parse_alpha(str(options.pop("alpha"))) if "alpha" in options else args.alpha
    if args.onnx.suffix != ".onnx":
        raise ValueError(f"--onnx must name a .onnx file, got {args.onnx}")
    if args.device != "cpu":
        raise ValueError("export runs on the CPU (--device cpu)")
    model = common.load_model(args)
    depth = len(model.blocks)
    if any(i >= depth for i in args.locations):
        raise ValueError(
            f"--locations {args.locations} out of range for {args.model} ({depth} blocks, 0-based)"
        )
    if crit != "none":
        patch(model, keep_rate=args.keep, criterion=crit, alpha=alpha, locations=args.locations,
              fuse=args.fuse, **options)  # fmt: skip
    size = model.pretrained_cfg.img_size
    export_onnx(model, args.onnx, image_size=size)
    what = model.renyiprune.describe() if crit != "none" else "unpruned"
    print(f"wrote {args.onnx} ({what})")
    if args.check:
        diff = onnx_max_difference(args.onnx, model, torch.randn(3, 3, size, size))
        print(f"onnxruntime vs torch: max |diff| = {diff:.3g}")
        if not diff <= args.tolerance:
            raise ValueError(f"onnxruntime differs from torch by {diff:.3g} > --tolerance {args.tolerance:g}")
    return 0
