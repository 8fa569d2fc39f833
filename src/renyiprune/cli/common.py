"""Argument types and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..core.entropy import parse_alpha
from ..core.selection import check_keep_rate
from ..data.images import DataError
from ..models.model import create_model, get_spec, list_models
from ..models.weights import WeightsError, read_state_dict

# Errors a user can cause with what they typed or pointed at: one line, exit 2, no traceback.
USER_ERRORS = (
    ValueError,
    TypeError,
    FileNotFoundError,
    NotADirectoryError,
    PermissionError,
    WeightsError,
    DataError,
)


def version() -> str:
    from .. import __version__

    return __version__


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _typed(fn, what: str):
    def parse(text: str):
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: {one_line(e)}") from None

    parse.__name__ = what
    return parse


def _list(item):
    return lambda text: [item(t) for t in text.split(",") if t.strip()]


def _budget(text: str) -> float:
    f = float(text)
    if not 0.0 < f <= 1.0:  # also rejects NaN
        raise ValueError("a budget is a fraction of the unpruned model's GMACs, in (0, 1]")
    return f


keep_rate = _typed(lambda t: check_keep_rate(float(t)), "keep rate")
keep_rates = _typed(_list(lambda t: check_keep_rate(float(t))), "keep rates")
budgets = _typed(_list(_budget), "budgets")
alpha = _typed(parse_alpha, "alpha")
alphas = _typed(_list(parse_alpha), "alphas")
names = _typed(_list(str.strip), "list")


def _locations(text: str) -> tuple[int, ...]:
    if text.strip().lower() in {"", "none"}:
        return ()
    locs = tuple(int(t) for t in text.split(","))
    if list(locs) != sorted(set(locs)) or any(i < 0 for i in locs):
        raise ValueError("block indices must be non-negative, increasing and distinct (0-based), e.g. 3,6,9")
    return locs


locations = _typed(_locations, "locations")


def _model_name(text: str) -> str:
    get_spec(text)
    return text


model_name = _typed(_model_name, "model")


def existing_path(text: str) -> Path:
    p = Path(text).expanduser()
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or directory")
    return p


def add_old_spelling(p: argparse.ArgumentParser, old: str, dest: str, **kwargs) -> None:
    """Accept ``old``, an earlier spelling of an option, as the option writing ``dest``; ``--help``
    leaves it out (the shared vocabulary: docs/cli.md)."""
    p.add_argument(old, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        type=model_name,
        default="deit_tiny_patch16_224",
        help=f"model name ({', '.join(list_models())})",
    )
    p.add_argument(
        "--weights",
        type=existing_path,
        default=None,
        help="local .safetensors/.pth weights; without it the official file is downloaded",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def load_model(args: argparse.Namespace, **kwargs) -> torch.nn.Module:
    """``args.model`` with ``args.weights``; a head of the size the weights carry (a model fine-tuned on
    Stanford Cars has 196 classes), unless ``num_classes`` is given."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    weights = args.weights
    if weights is not None and "num_classes" not in kwargs:
        weights = read_state_dict(weights)  # read once: for the head size and for the model
        head = weights.get("head.weight")
        if head is not None:
            kwargs["num_classes"] = int(head.shape[0])
    model = create_model(args.model, weights=weights, pretrained=weights is None, **kwargs)
    return model.to(args.device)


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, allow_nan=False, default=str)
    sys.stdout.write("\n")


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Plain, aligned text table (first column left-aligned, the rest right-aligned)."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells):
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in pairs)

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])
