"""Throughput, latency and peak memory of several models on one input, measured side by side.

Timing interleaves the configurations (round-robin) after a warm-up, so that a slow phase of a shared
machine hits all of them alike; speedups are medians of per-round ratios. Memory on CPU is the peak
of live tensor storage during one forward, tracked at the dispatcher (the CPU twin of CUDA's
``max_memory_allocated``); workspaces that a fused kernel allocates inside itself are not seen.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .evaluate import PruneConfig, pruned_view
from .flops import count_gmacs

__all__ = [
    "Timing",
    "PeakTensorMemory",
    "peak_forward_memory",
    "time_interleaved",
    "autocast_context",
    "machine_info",
    "BenchRow",
    "benchmark_configs",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Timing:
    """Seconds per batch of one configuration, one entry per round."""

    name: str
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median over the rounds: how noisy this configuration's timings were."""
        return (max(self.seconds) - min(self.seconds)) / self.median

    def to_dict(self) -> dict:
        return dict(asdict(self), median=self.median, spread=self.spread)


def autocast_context(device: str | torch.device, dtype: torch.dtype):
    """torch.autocast for float16/bfloat16 on ``device``; a no-op context for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


@torch.inference_mode()
def time_interleaved(
    models: Mapping[str, Callable[[Tensor], Tensor]],
    x: Tensor,
    *,
    warmup: int = 2,
    reps: int = 5,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Timing]:
    """Time each model's forward on ``x``: ``warmup`` untimed rounds, then ``reps`` round-robin rounds.

    The starting configuration rotates each round, so none is always first after a pause.
    """
    names = list(models)
    sync = _sync(x.device)
    out = {n: Timing(n) for n in names}
    with autocast_context(x.device, dtype):
        for r in range(warmup + reps):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                sync()
                t0 = time.perf_counter()
                models[name](x)
                sync()
                if r >= warmup:
                    out[name].seconds.append(time.perf_counter() - t0)
            if progress:
                what = "warm-up" if r < warmup else f"round {r - warmup + 1}/{reps}"
                progress(f"{what} done")
    return out


def paired_ratio(num: Timing, den: Timing) -> float:
    """Median over rounds of num/den seconds (e.g. unpruned / pruned = speedup), paired by round."""
    return statistics.median(a / b for a, b in zip(num.seconds, den.seconds, strict=True))


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated by ops while active (views and in-place ops add nothing).

    A storage counts from the op that creates it until its last tensor or view is freed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr in seen or ptr in self._live or st.nbytes() == 0:
                    continue
                self._live.add(ptr)
                self.current += st.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(st, self._free, ptr, st.nbytes())
        return out

    def _free(self, ptr: int, nbytes: int) -> None:
        self._live.discard(ptr)
        self.current -= nbytes


@torch.inference_mode()
def peak_forward_memory(
    model: Callable[[Tensor], Tensor], x: Tensor, dtype: torch.dtype = torch.float32
) -> int:
    """Peak bytes allocated during one forward beyond what was allocated before it (input, weights).

    CUDA: ``torch.cuda.max_memory_allocated``; CPU: ``PeakTensorMemory``.
    """
    with autocast_context(x.device, dtype):
        if x.device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = model(x)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            del out
            return int(peak)
        with PeakTensorMemory() as tracker:
            out = model(x)
            del out
        return int(tracker.peak)


def compile_model(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """``torch.compile`` with automatic dynamic shapes (the token count changes at each pruning block)."""
    return torch.compile(model, dynamic=None)


def machine_info(device: str | torch.device = "cpu") -> dict:
    """What the numbers were measured on."""
    dev = torch.device(device)
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": _cpu_name(),
        "device": str(dev),
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def _cpu_name() -> str:
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
    return platform.processor() or "unknown"


@dataclass
class BenchRow:
    """One configuration's numbers; ratios are against the unpruned model of the same run."""

    config: str
    criterion: str | None
    alpha: float | None
    keep_rate: float | None
    compiled: bool
    latency_ms: float
    latency_min_ms: float
    latency_max_ms: float
    spread: float
    images_per_s: float
    speedup: float
    gmacs: float
    gmacs_ratio: float
    efficiency: float
    peak_mb: float
    memory_ratio: float
    vs_evit: float | None = None  # throughput / evit's at the same keep rate (paired by round)

    def to_dict(self) -> dict:
        """Plain JSON values: alpha = inf becomes "inf", NaN ratios become None."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None if math.isnan(v) else str(v)
        return d


def benchmark_configs(
    model: nn.Module,
    configs: list[PruneConfig],
    x: Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    warmup: int = 2,
    reps: int = 5,
    compile: bool = False,
    extra: Mapping[str, nn.Module] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    """Time the unpruned ``model`` and each pruning configuration (and ``extra`` models) on batch ``x``.

    All share the model's weights (``pruned_view``). With ``compile`` every configuration is measured
    both eager and through ``torch.compile``. GMACs are per image, counted on the eager forward.
    """
    say = progress or (lambda _msg: None)
    base = PruneConfig(criterion=None)
    cfgs = [base, *[c for c in configs if c.criterion is not None]]
    views = {c.label: pruned_view(model, c) for c in cfgs}
    meta: dict[str, tuple[PruneConfig | None, bool, nn.Module]] = {
        name: (c, False, views[name]) for name, c in zip(views, cfgs, strict=True)
    }
    for name, m in (extra or {}).items():
        meta[name] = (None, False, m)
    runners: dict[str, Callable[[Tensor], Tensor]] = {name: m for name, (_, _, m) in meta.items()}
    if compile:
        for name in list(meta):
            c, _, m = meta[name]
            meta[f"{name} [compiled]"] = (c, True, m)
            runners[f"{name} [compiled]"] = compile_model(m)
        # A compiled model compiles on its first call and recompiles once more on its second (the
        # pruning state's per-forward counter becomes dynamic); neither may land in a timed round.
        warmup = max(warmup, 2)
    image = x[:1].float()
    gmacs = {
        name: count_gmacs(m, image.to(next(model.parameters()).dtype)) for name, (_, _, m) in meta.items()
    }
    say(f"timing {len(runners)} configurations: {warmup} warm-up + {reps} interleaved rounds")
    timings = time_interleaved(runners, x, warmup=warmup, reps=reps, dtype=dtype, progress=say)
    say("measuring peak memory")
    peaks = {
        name: peak_forward_memory(runners[name] if meta[name][1] and x.is_cuda else meta[name][2], x, dtype)
        for name in runners
    }
    rows = []
    for name, t in timings.items():
        c, compiled, _ = meta[name]
        ref = "unpruned [compiled]" if compiled else "unpruned"
        speedup = paired_ratio(timings[ref], t)
        g_ratio = gmacs[ref] / gmacs[name]
        rows.append(
            BenchRow(
                config=name,
                criterion=c.criterion if c else None,
                alpha=c.alpha if c and c.criterion == "renyi" else None,
                keep_rate=c.keep_rate if c and c.criterion else None,
                compiled=compiled,
                latency_ms=1e3 * t.median,
                latency_min_ms=1e3 * min(t.seconds),
                latency_max_ms=1e3 * max(t.seconds),
                spread=t.spread,
                images_per_s=x.shape[0] / t.median,
                speedup=speedup,
                gmacs=gmacs[name],
                gmacs_ratio=g_ratio,
                efficiency=speedup / g_ratio,
                peak_mb=peaks[name] / 2**20,
                memory_ratio=peaks[name] / peaks[ref] if peaks[ref] else float("nan"),
            )
        )
    by_key = {(r.criterion, r.keep_rate, r.compiled): r for r in rows if r.criterion == "evit"}
    for r in rows:
        ev = by_key.get(("evit", r.keep_rate, r.compiled))
        if ev is not None and r.criterion not in (None, "evit"):
            r.vs_evit = paired_ratio(timings[ev.config], timings[r.config])
    return rows
