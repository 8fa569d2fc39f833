"""The probe's disk feature cache: labelled image sets, the hash of the code that computes pruned
features, and one file of features per (configuration, image set), keyed by everything that decides it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..data.images import Sample
from ..planning.points import Point
from ..utils.io import atomic_path, output_lock

__all__ = ["ImageSet", "FeatureCache", "feature_code_files"]

#: Files whose code decides the features: a change to any of them invalidates cached features.
# The code that computes pruned features, relative to the package: the whole core, the model, and
# what turns a configuration into a plan. A change to any of them gives new cache keys.
_FEATURE_CODE = (
    "core/*.py", "models/model.py", "planning/budget.py", "planning/build.py", "planning/specs.py",
)  # fmt: skip


@dataclass(frozen=True)
class ImageSet:
    """A named list of labelled images (a ``--train`` or ``--eval`` folder); ``crop_bottom`` pixels of
    every image are cut off before the transform (FGVC-Aircraft's banner)."""

    name: str
    samples: tuple[Sample, ...]
    crop_bottom: int = 0

    def fingerprint(self) -> str:
        """SHA-256 of the resolved paths and labels, in order."""
        h = hashlib.sha256(f"crop={self.crop_bottom}\n".encode())
        for s in self.samples:
            h.update(f"{Path(s.path).resolve()}\t{int(s.label)}\n".encode())
        return h.hexdigest()

    @property
    def labels(self) -> Tensor:
        return torch.tensor([int(s.label) for s in self.samples], dtype=torch.int64)


def feature_code_files() -> list[Path]:
    """The source files whose contents key the feature cache (:data:`_FEATURE_CODE`), sorted."""
    pkg = Path(__file__).resolve().parents[1]
    found = {pattern: sorted(pkg.glob(pattern)) for pattern in _FEATURE_CODE}
    missing = [pattern for pattern, files in found.items() if not files]
    if missing:  # a moved module must not silently drop out of the key
        raise RuntimeError(f"feature-cache code not found under {pkg}: {missing}")
    return sorted({f for files in found.values() for f in files})


def _code_hash() -> str:
    pkg = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in feature_code_files():
        h.update(f.relative_to(pkg).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


class FeatureCache:
    """Features of (configuration, image set) pairs on disk, one file each, written atomically.

    The key holds the model name, the weights' identity (``models.model.weights_id``: the SHA-256 of
    the file), the transform, the code that computes the features (a hash of the pruning modules,
    unless ``context`` names one: reading features written by an earlier version), the configuration
    and the image list, so a changed input never reuses stale features. Whoever computes features
    holds :meth:`writing` (one writer per folder); reading needs no lock (files are replaced whole).
    ``flag`` is the option that names the folder, for the message a second writer gets.
    """

    def __init__(self, root: str | Path, context: dict, flag: str = "--cache") -> None:
        self.root = Path(root)
        self.context = {"code": _code_hash(), **context, "format": 1}  # a given "code" wins (reports)
        self.flag = flag

    def writing(self) -> contextlib.AbstractContextManager:
        """The folder's ``output_lock`` (re-entrant; under torchrun rank 0's)."""
        return output_lock(self.root, self.flag)

    def key(self, config: Point, images: ImageSet) -> str:
        text = json.dumps({"context": self.context, "config": config.to_dict(),
                           "images": images.fingerprint()}, sort_keys=True, default=str)  # fmt: skip
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def path(self, config: Point, images: ImageSet) -> Path:
        return self.root / f"{self.key(config, images)}.pt"

    def load(self, config: Point, images: ImageSet) -> Tensor | None:
        p = self.path(config, images)
        if not p.is_file():
            return None
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # a file we cannot read is recomputed (and then replaced)
            return None
        feats = obj.get("features") if isinstance(obj, dict) else None
        if not isinstance(feats, Tensor) or feats.shape[0] != len(images.samples):
            return None
        return feats

    def save(self, config: Point, images: ImageSet, features: Tensor) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.path(config, images)
        meta = {"label": config.label, "images": images.name, "count": len(images.samples)}
        with atomic_path(target) as tmp:
            torch.save({"features": features.contiguous(), "meta": json.dumps(meta)}, tmp)
