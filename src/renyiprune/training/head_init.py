"""``--head-init probe``: start the new classifier from the linear probe instead of random weights.

The unpruned model's final CLS features (after the last norm: exactly what the head reads) of the
training split, under the evaluation transform, are fitted with ``experiments.probe.fit_probe``
(logistic regression, L2 chosen on a held-out fifth of the training images by file-name hash); the
fitted weights become ``model.head``. Before any step the model then scores what ``renyiprune probe
--head per-config`` scores for the unpruned model. With ``head_cache`` the features are kept in a
``probe --cache`` folder (the same key: model, weights, transform, code, image list) and the fitted
head next to them, so the runs of a grid compute them once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..core.plans import UNPRUNED as UNPRUNED_PLAN
from ..data.datasets import DatasetSplit
from ..experiments.probe import (
    FeatureCache,
    ImageSet,
    LinearHead,
    ProbeConfig,
    extract_features,
    fit_probe,
    is_holdout,
)
from ..planning.points import Point
from ..utils import distributed as D
from ..utils.io import atomic_path

__all__ = ["HEAD_INITS", "probe_head", "init_head_from_probe"]

#: ``new``: random (or the checkpoint's, see ``resolve_head``); ``probe``: the fitted linear probe.
HEAD_INITS = ("new", "probe")
UNPRUNED = Point(UNPRUNED_PLAN)


def _head_path(cache: FeatureCache, images: ImageSet, num_classes: int) -> Path:
    key = json.dumps({"features": cache.key(UNPRUNED, images), "classes": num_classes, "fit": "fit_probe"})
    return cache.root / f"head-{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"


def probe_head(
    model: nn.Module, split: DatasetSplit, transform: Callable, num_classes: int, options: ProbeConfig
) -> LinearHead:
    """The linear probe of the unpruned ``model`` fitted on ``split``: read from ``options.cache`` (a
    ``--head-cache`` folder) if there, else computed and saved holding the folder's lock."""
    images = ImageSet(split.split, tuple(split.samples), split.crop_bottom)
    cache = options.cache
    if cache is not None:
        path = _head_path(cache, images, num_classes)
        if path.is_file():
            obj = torch.load(path, map_location="cpu", weights_only=True)
            return LinearHead(obj["weight"], obj["bias"], float(obj["l2"]))
    with cache.writing() if cache is not None else contextlib.nullcontext():
        head = _fit_head(model, images, transform, num_classes, options)
        if cache is not None and D.rank() == 0:  # under torchrun every rank fits the same head
            with atomic_path(_head_path(cache, images, num_classes)) as tmp:
                torch.save({"weight": head.weight, "bias": head.bias, "l2": head.l2}, tmp)
    return head


def _fit_head(
    model: nn.Module, images: ImageSet, transform: Callable, num_classes: int, options: ProbeConfig
) -> LinearHead:
    t0 = time.perf_counter()
    training = model.training
    model.eval()  # a fixed feature extractor: no drop-path while the probe's features are computed
    try:
        got, timing = extract_features(model, [UNPRUNED], [images], transform, options)
    finally:
        model.train(training)
    feats = got[(0, 0)]
    if options.progress and timing["computed"]:
        print(f"renyiprune train: probe features of {len(feats)} images in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)  # fmt: skip
    holdout = torch.tensor([is_holdout(s.path) for s in images.samples], dtype=torch.bool)
    if not holdout.any() or holdout.all():  # too few images to hold any out: the middle L2 of the grid
        head = fit_probe(feats, images.labels, num_classes, l2_grid=(1e-3,))
    else:
        head = fit_probe(feats, images.labels, num_classes, holdout)
    return head


def init_head_from_probe(model: nn.Module, head: LinearHead) -> None:
    """Copy the probe's weights into ``model.head`` (a Linear of the same shape)."""
    if tuple(model.head.weight.shape) != tuple(head.weight.shape):
        have, want = tuple(head.weight.shape), tuple(model.head.weight.shape)
        raise ValueError(f"the probe's head is {have}; the model's head is {want}")
    with torch.no_grad():
        model.head.weight.copy_(head.weight.to(model.head.weight))
        model.head.bias.copy_(head.bias.to(model.head.bias))
