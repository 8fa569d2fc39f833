"""Sweeps as the ``sweep``, ``tune-alpha`` and ``tune-budget`` commands run them: a model, images, a log.

An ``ImageRun`` names the model (and the weights that key its records), where the images come from and
how to run (``SweepSettings``). ``run_points`` evaluates points on some of the images, resuming a
``ResultLog`` whose fingerprint says which model, weights, images and part of them it holds;
``run_grid_sweep`` is the ``sweep`` command's whole run: every point on every image, then
results.csv, results.md, the Pareto plot and timing.json in the output folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..data.datasets import BannerCropped, eval_transform
from ..data.images import check_labels
from ..models.model import weights_id
from ..planning.points import Point
from ..utils import distributed as D
from ..utils.io import atomic_write_text, output_lock
from .sweep import ResultLog, SweepSettings, fingerprint, sweep_samples
from .tables import markdown_tables, to_csv

__all__ = ["ImageRun", "check_model", "run_points", "write_outputs", "run_grid_sweep"]


@dataclass(frozen=True)
class ImageRun:
    """``model`` (registry name ``model_name``, ``weights`` a file or None for the official ones) on images
    from ``data_key`` (what identifies their source in records), ``crop_bottom`` pixel rows cut off each
    (FGVC-Aircraft's banner), run as ``settings`` say."""

    model: nn.Module
    model_name: str
    weights: str | Path | None
    data_key: str
    crop_bottom: int = 0
    settings: SweepSettings = SweepSettings()


def check_model(model: nn.Module, samples: Sequence, locations: Sequence[int], model_name: str) -> None:
    """Every label of ``samples`` is a class of ``model``'s head and every pruning location one of its
    blocks (checked before the first forward, and before anything is written)."""
    check_labels(samples, model.num_classes)
    depth = len(model.blocks)
    if any(i >= depth for i in locations):
        raise ValueError(f"--locations {tuple(locations)} out of range for {model_name} ({depth} blocks, "
                         "0-based)")  # fmt: skip


def run_points(run: ImageRun, samples: Sequence, points: Sequence[Point], log_path: Path, part: str
               ) -> tuple[list[dict], dict]:  # fmt: skip
    """``sweep.sweep_samples`` of ``points`` on ``samples`` (``part`` of the run's images), resuming the log
    at ``log_path``; records in ``points`` order, and timing."""
    fp = fingerprint(run.model_name, weights_id(run.model_name, run.weights), run.data_key, samples, part)
    transform = eval_transform("center-crop", run.model.pretrained_cfg)
    if run.crop_bottom:
        transform = BannerCropped(transform, run.crop_bottom)
    return sweep_samples(run.model, points, samples, ResultLog(log_path, fp), transform, run.settings)


def write_outputs(out: Path, records: list[dict], title: str) -> None:
    """results.csv, results.md and pareto.png/.svg in ``out``, each written atomically."""
    atomic_write_text(out / "results.csv", to_csv(records))
    atomic_write_text(out / "results.md", markdown_tables(records))
    from .pareto import pareto_plot

    pareto_plot(records, out / "pareto", title=title)


def run_grid_sweep(run: ImageRun, points: Sequence[Point], samples: Sequence, out: Path
                   ) -> tuple[list[dict], dict]:  # fmt: skip
    """Every point on every sample, resuming ``out``/results.jsonl (a second sweep on ``out`` stops at its
    lock); rank 0 then writes the tables, the Pareto plot and timing.json. Records and timing
    (``ran``: points run now, the others were resumed)."""
    with output_lock(out, collective=True):
        t0 = time.perf_counter()
        records, timing = run_points(run, samples, points, out / "results.jsonl", "all")
        timing["total_s"] = time.perf_counter() - t0
        if D.rank() == 0:
            write_outputs(out, records, f"{run.model_name}, {records[0]['images'] if records else 0} images")
            atomic_write_text(out / "timing.json", json.dumps(timing, indent=2) + "\n")
    return records, timing
