"""Argument types and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

from ..core.entropy import parse_alpha
from ..core.selection import check_keep_rate
from ..data.datasets import DATASETS, DEFAULT_SPLITS, BannerCropped, load_split
from ..data.images import DataError, Sample, list_samples
from ..models.model import create_model, get_spec, list_models
from ..models.weights import WeightsError, read_state_dict
from ..planning.policy import load_policy
from ..planning.specs import check_options, split_criterion

# Errors a user can cause with what they typed or pointed at: one line, exit 2, no traceback.
USER_ERRORS = (
    ValueError,
    TypeError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    WeightsError,
    DataError,
)


def version() -> str:
    from .. import __version__

    return __version__


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


@contextmanager
def naming(flag: str, value: str) -> Iterator[None]:
    """A ValueError raised in the block is raised again as one line that starts with ``flag`` and the
    ``value`` given to it (unless it names ``flag`` already)."""
    try:
        yield
    except ValueError as e:
        if flag in str(e):
            raise
        raise ValueError(f"{flag} {value!r}: {one_line(e)}") from e


def _typed(fn, what: str):
    def parse(text: str):
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: {one_line(e)}") from None

    parse.__name__ = what
    return parse


def _list(item):
    """A comma list of ``item`` values; an empty list (``''``, ``','``) is an error, not "nothing to do"."""

    def parse(text: str) -> list:
        values = [item(t) for t in text.split(",") if t.strip()]
        if not values:
            raise ValueError("give at least one value (a comma list)")
        return values

    return parse


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
#: ``--tokens``: patches kept at each location, one count or one per location.
token_counts = _typed(lambda text: tuple(_list(lambda t: _at_least(int(t), 1))(text)), "token counts")
#: ``--tome-r``: ToMe's tokens merged after every block, one r per run.
tome_rs = _typed(_list(lambda t: _at_least(int(t), 0)), "r list")


def _at_least(n: int, low: int) -> int:
    if n < low:
        raise ValueError(f"each value must be >= {low}")
    return n


def _locations(text: str) -> tuple[int, ...]:
    if text.strip().lower() in {"", "none"}:  # no block: the unpruned model under a pruned config's label
        raise ValueError("give at least one 0-based block, e.g. 3,6,9 (the unpruned model: --criterion none)")
    locs = tuple(int(t) for t in text.split(","))
    if list(locs) != sorted(set(locs)) or any(i < 0 for i in locs):
        raise ValueError("block indices must be non-negative, increasing and distinct (0-based), e.g. 3,6,9")
    return locs


locations = _typed(_locations, "locations")


def integer(low: int = 0, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in [``low``, ``high``] (no upper limit when ``high`` is None)."""

    def parse(text: str) -> int:
        n = int(text)
        if n < low or (high is not None and n > high):
            raise ValueError(f"must be in [{low}, {high}]" if high is not None else f"must be >= {low}")
        return n

    return _typed(parse, "integer")


def real(low: float = -math.inf, high: float = math.inf, *, open_low: bool = False,
         open_high: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in the interval given (``open_*``: that end excluded)."""
    if math.isinf(low) and math.isinf(high):
        wanted = "a finite number"
    elif math.isinf(high):
        wanted = f"a finite number {'>' if open_low else '>='} {low:g}"
    else:
        wanted = f"a number in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"

    def parse(text: str) -> float:
        x = float(text)
        inside = (low < x if open_low else low <= x) and (x < high if open_high else x <= high)
        if not (math.isfinite(x) and inside):  # NaN is neither finite nor inside
            raise ValueError(f"must be {wanted}")
        return x

    return _typed(parse, "number")


def _model_name(text: str) -> str:
    get_spec(text)
    return text


model_name = _typed(_model_name, "model")


def output_path(text: str) -> Path:
    """An argparse type: a path to write to; an empty one is refused (it would mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("give a path ('' would mean the current folder)")
    return Path(text).expanduser()


def existing_path(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("give a path ('' would mean the current folder)")
    p = Path(text).expanduser()
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or directory")
    return p


def existing_file(text: str) -> Path:
    """An argparse type: a path that exists and is a file (not a folder)."""
    p = existing_path(text)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{text}: not a file")
    return p


def _policy_file(text: str) -> Path:
    p = existing_file(text)
    load_policy(p)  # read and checked now, also where no configuration asks it
    return p


#: An argparse type: a policy JSON file that reads (``planning.policy.load_policy``).
policy_file = _typed(_policy_file, "policy")


def existing_dir(text: str) -> Path:
    """An argparse type: a path that exists and is a folder."""
    p = existing_path(text)
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a folder")
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
        type=existing_file,
        default=None,
        help="local .safetensors/.pth weights; without it the official file is downloaded",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--threads", type=integer(1), default=None, help="torch CPU threads")


def criterion_spec(text: str) -> tuple[str, dict]:
    """'renyi[cls_key=exclude]' -> ('renyi', {'cls_key': 'exclude'}): the one bracket grammar
    (``planning.specs.split_criterion``), the criterion's options checked at once
    (``specs.check_options``)."""
    with naming("--criterion", text):
        name, options = split_criterion(text)
        check_options(name, options)
    return name, options


# ------------------------------------------------------------------------------------------- images


def _eval_splits() -> str:
    """'val for imagefolder, ...; test for flowers102, ...': each data set's default evaluation split."""
    by_split: dict[str, list[str]] = {}
    for name, (_, split) in DEFAULT_SPLITS.items():
        by_split.setdefault(split, []).append(name)
    return "; ".join(f"{split} for {', '.join(names)}" for split, names in by_split.items())


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The images a command reads, the same flags everywhere (read by :func:`read_images`): a folder
    (``--data``) or one split of a named data set in its official layout (``--dataset``, ``--split``,
    ``--data-root``)."""
    g = p.add_argument_group("images: --data DIR, or --dataset NAME --data-root DIR [--split SPLIT]")
    g.add_argument("--data", type=existing_dir, default=None,
                   help="folder with labels.tsv (file, class_index, ...) or an ImageFolder tree")
    g.add_argument("--dataset", choices=DATASETS, default=None,
                   help="a named data set read from --data-root in its official layout")
    g.add_argument("--split", default=None, help=f"split of --dataset (default: {_eval_splits()})")
    g.add_argument("--data-root", type=existing_dir, default=None, help="the folder holding --dataset")


class ImageSource(NamedTuple):
    """The images the data flags name: samples (``--limit`` applied), the pixel rows to crop off the bottom
    of each (FGVC-Aircraft's banner), a label for reports and a key that identifies them in saved records."""

    samples: list[Sample]
    crop_bottom: int
    label: str
    key: str

    def view(self, transform):
        """``transform`` preceded by the bottom crop, when there is one."""
        return BannerCropped(transform, self.crop_bottom) if self.crop_bottom else transform


def read_images(args: argparse.Namespace) -> ImageSource:
    """List what ``--data`` or ``--dataset/--split/--data-root`` name, ``--limit`` applied; a DataError or
    ValueError says in one line what is wrong (a missing split's files: how many, and the first few)."""
    data, name = args.data, args.dataset
    if data is not None and name is not None:
        raise ValueError("give --data DIR or --dataset NAME --data-root DIR, not both")
    if name is None:
        given = [f for f in ("split", "data_root") if getattr(args, f) is not None]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} goes with --dataset NAME")
        if data is None:
            raise ValueError("give --data DIR or --dataset NAME --data-root DIR")
        source = ImageSource(list_samples(data), 0, str(data), str(Path(data).resolve()))
    else:
        if args.data_root is None:
            raise ValueError(f"--dataset {name} needs --data-root DIR")
        split = args.split or DEFAULT_SPLITS[name][1]
        ds = load_split(name, args.data_root, split)
        key = f"{name}:{split}:{Path(args.data_root).resolve()}"
        source = ImageSource(ds.samples, ds.crop_bottom, f"{name} {split} in {args.data_root}", key)
    limit = getattr(args, "limit", None)
    if limit is not None:
        if limit < 1:
            raise ValueError("--limit must be >= 1")
        source = source._replace(samples=source.samples[:limit])
    return source


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
    try:
        model = create_model(args.model, weights=weights, pretrained=weights is None, **kwargs)
    except WeightsError as e:  # weights of another architecture: say which file and which --model
        if args.weights is None:
            raise
        raise WeightsError(f"--weights {args.weights} do not fit --model {args.model}: {one_line(e)}") from e
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
