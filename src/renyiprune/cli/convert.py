"""``renyiprune convert``: weights between renyiprune/timm names and Hugging Face ViT names, both ways."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..models.weights import WeightsError, read_state_dict
from . import common

_HF_FILES = ("model.safetensors", "pytorch_model.bin")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert weights between renyiprune (timm) names and a Hugging Face ViT folder",
        description="--to hf: renyiprune/timm weights -> a folder with model.safetensors and config.json "
        "that transformers' ViTForImageClassification.from_pretrained reads. --to renyiprune: a Hugging "
        "Face ViT folder or weights file -> one .safetensors file for --weights. Both are checked strictly "
        "against --model and written atomically.",
    )
    p.add_argument("input", type=common.existing_path, help="weights file, or a Hugging Face model folder")
    p.add_argument("output", type=common.output_path,
                   help="--to hf: output folder; --to renyiprune: .safetensors file")
    p.add_argument("--to", choices=["hf", "renyiprune"], required=True)
    p.add_argument("--model", type=common.model_name, default="deit_tiny_patch16_224",
                   help="architecture of the weights (checked strictly)")  # fmt: skip
    p.set_defaults(run=run)


def _hf_weights(path: Path) -> Path:
    if path.is_file():
        return path
    for name in _HF_FILES:
        if (path / name).is_file():
            return path / name
    raise WeightsError(f"{path} holds no Hugging Face weights ({' or '.join(_HF_FILES)})")


def _check_ours(model: str, sd: dict, source: Path) -> int:
    """Load into our model strictly (WeightsError lists every mismatch, naming ``source`` and --model);
    returns the class count."""
    from ..models.model import create_model

    head = sd.get("head.weight")
    classes = int(head.shape[0]) if head is not None else 0
    try:
        create_model(model, weights=sd, num_classes=classes)
    except WeightsError as e:
        raise WeightsError(f"{source} does not fit --model {model}: {common.one_line(e)}") from e
    return classes


def run(args: argparse.Namespace) -> int:
    from ..models.export import save_safetensors
    from ..models.hf import config_dict, from_hf, to_hf
    from ..utils.io import atomic_path

    if args.to == "hf":
        sd = read_state_dict(args.input)
        classes = _check_ours(args.model, sd, args.input)
        if args.output.exists() and not args.output.is_dir():
            raise NotADirectoryError(f"--to hf writes a folder; {args.output} is a file")
        save_safetensors(to_hf(sd, "v4"), args.output / "model.safetensors", metadata={"format": "pt"})
        with atomic_path(args.output / "config.json") as tmp:
            tmp.write_text(json.dumps(config_dict(args.model, classes), indent=2) + "\n")
        print(f"wrote {args.output}/model.safetensors and config.json (ViTForImageClassification)")
        return 0
    hf_sd = read_state_dict(_hf_weights(args.input))
    try:
        sd = from_hf(hf_sd)
    except ValueError as e:
        raise WeightsError(f"{args.input}: {e}") from e
    _check_ours(args.model, sd, args.input)
    if args.output.suffix != ".safetensors":
        raise ValueError(f"--to renyiprune writes a .safetensors file; got {args.output}")
    save_safetensors(sd, args.output)
    print(f"wrote {args.output} ({len(sd)} tensors, {args.model})")
    return 0
