"""Throughput, latency and peak memory of several models on one input, measured side by side.

Timing interleaves the configurations (round-robin) after a warm-up, so that a slow phase of a shared
machine hits all of them alike; speedups are medians of per-round ratios. Memory on CPU is the peak
of live tensor storage during one forward, tracked at the dispatcher (the CPU twin of CUDA's
``max_memory_allocated``); workspaces that a fused kernel allocates inside itself are not seen.
The same forward also records the peak inside each transformer block (forward hooks), so that the
peak of the pruned part (the blocks from the first one that removes tokens) is reported beside the
whole-forward peak, which at strong pruning is set by the unpruned first blocks.
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

from ..core.criteria import takes_alpha
from ..core.plans import UNPRUNED, MergePlan
from ..core.state import is_patched
from ..planning.flops import count_gmacs
from ..planning.points import Point
from .evaluate import pruned_view

__all__ = [
    "Timing",
    "PeakTensorMemory",
    "peak_forward_memory",
    "ForwardMemory",
    "forward_memory",
    "time_interleaved",
    "autocast_context",
    "machine_info",
    "BenchRow",
    "benchmark_configs",
    "BenchSettings",
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
        self.window_peak = 0  # peak since the last ``start_window`` (e.g. one block's forward)
        self._live: set[int] = set()

    def start_window(self) -> None:
        self.window_peak = self.current

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
                self.window_peak = max(self.window_peak, self.current)
                weakref.finalize(st, self._free, ptr, st.nbytes())
        return out

    def _free(self, ptr: int, nbytes: int) -> None:
        self._live.discard(ptr)
        self.current -= nbytes


@dataclass
class ForwardMemory:
    """Peak bytes of one forward beyond what was allocated before it: the whole forward and each block."""

    peak: int
    block_peaks: list[int]

    def peak_from(self, first_block: int | None) -> int:
        """Peak over the blocks ``first_block``.. (the pruned part); the whole forward when None."""
        if first_block is None or not self.block_peaks:
            return self.peak
        return max(self.block_peaks[first_block:])


def _blocks(model) -> list[nn.Module]:
    from ..core.hosts import check_model

    try:
        return list(check_model(model)) if isinstance(model, nn.Module) else []
    except TypeError:  # not a ViT this package knows: whole-forward peak only
        return []


@torch.inference_mode()
def forward_memory(
    model: Callable[[Tensor], Tensor], x: Tensor, dtype: torch.dtype = torch.float32
) -> ForwardMemory:
    """Peak memory of one forward (CUDA: ``max_memory_allocated``; CPU: ``PeakTensorMemory``), in bytes
    above what was allocated before it, and the peak inside each transformer block (forward hooks)."""
    blocks = _blocks(model)
    cuda = x.device.type == "cuda"
    block_peaks = [0] * len(blocks)
    state: dict = {"tracker": None, "base": 0, "before": 0}

    def pre(i):
        def hook(_module, _args):
            if cuda:  # the peak so far is kept, then the counter restarts for this block
                torch.cuda.synchronize()
                state["before"] = max(state["before"], torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()
            else:
                state["tracker"].start_window()

        return hook

    def post(i):
        def hook(_module, _args, _out):
            if cuda:
                torch.cuda.synchronize()
                block_peaks[i] = max(block_peaks[i], torch.cuda.max_memory_allocated() - state["base"])
            else:
                block_peaks[i] = max(block_peaks[i], state["tracker"].window_peak)

        return hook

    handles = [b.register_forward_pre_hook(pre(i)) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post(i)) for i, b in enumerate(blocks)]
    try:
        with autocast_context(x.device, dtype):
            if cuda:
                torch.cuda.synchronize()
                state["base"] = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                out = model(x)
                torch.cuda.synchronize()
                peak = max(state["before"], torch.cuda.max_memory_allocated()) - state["base"]
                del out
                return ForwardMemory(int(peak), block_peaks)
            with PeakTensorMemory() as tracker:
                state["tracker"] = tracker
                out = model(x)
                del out
            return ForwardMemory(int(tracker.peak), block_peaks)
    finally:
        for h in handles:
            h.remove()


def peak_forward_memory(
    model: Callable[[Tensor], Tensor], x: Tensor, dtype: torch.dtype = torch.float32
) -> int:
    """Peak bytes allocated during one forward beyond what was allocated before it (input, weights).

    CUDA: ``torch.cuda.max_memory_allocated``; CPU: ``PeakTensorMemory``.
    """
    return forward_memory(model, x, dtype).peak


def _compile_room(models: int):
    """Room in dynamo's per-function cache for ``models`` compiled views: they share their classes'
    forward code, and past the recompile limit (default 8) dynamo silently runs a function eagerly."""
    if not models:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(recompile_limit=max(8, 4 * models))


def _compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


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
    """One configuration's numbers; ratios are against the unpruned model of the same run.

    ``peak_mb``: peak of the whole forward; ``pruned_peak_mb``: peak inside the blocks from
    ``pruned_from`` (the first block that removes tokens) on, and ``pruned_memory_ratio`` that against
    the unpruned model's peak in the same blocks; ``block_peaks_mb``: the peak inside every block.
    """

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
    gmacs_ratio: float  # the unpruned model's GMACs ÷ this one's: 1.54 = 1.54x fewer GMACs
    efficiency: float
    peak_mb: float
    memory_ratio: float
    vs_evit: float | None = None  # throughput / evit's at the same keep rate or budget (paired by round)
    budget: float | None = None
    removed: str | None = None
    pruned_from: int | None = None
    pruned_peak_mb: float | None = None
    pruned_memory_ratio: float | None = None
    block_peaks_mb: list[float] | None = None

    def to_dict(self) -> dict:
        """Plain JSON values: alpha = inf becomes "inf", NaN ratios become None."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None if math.isnan(v) else str(v)
        return d


def _describe(p: Point | None, view: nn.Module) -> dict:
    """criterion, alpha, keep rate, budget, removed and first reducing block of one configuration."""
    if p is None or p.plan == UNPRUNED:
        return dict(criterion=None, alpha=None, keep_rate=None, budget=None, removed=None, pruned_from=None)
    d = p.to_dict()
    opts = d["options"]
    state = view.renyiprune if is_patched(view) else None
    locs = state.locations if state is not None else ()
    tome = isinstance(p.plan, MergePlan)
    alpha = float(d["alpha"]) if takes_alpha(d["criterion"], opts) else None
    if tome:
        alpha = p.plan.alpha if p.plan.entropy_weight else None
    return dict(
        criterion=d["criterion"],
        alpha=alpha,
        keep_rate=d["keep_rate"] if not tome and p.budget is None and "tokens" not in opts else None,
        budget=p.budget,
        removed="merge" if tome else p.plan.removed,
        pruned_from=min(locs) if locs else None,
    )


@dataclass(frozen=True)
class BenchSettings:
    """How the timing runs: autocast ``dtype`` below float32, untimed ``warmup`` and timed interleaved
    ``reps`` rounds, each configuration also through ``torch.compile``, and peak memory (one more forward)."""

    dtype: torch.dtype = torch.float32
    warmup: int = 2
    reps: int = 5
    compile: bool = False
    memory: bool = True


Meta = dict[str, tuple[Point | None, bool, nn.Module]]  # name: (configuration, compiled, module)


def _runners(model: nn.Module, configs: list[Point], extra: Mapping[str, nn.Module] | None, compile: bool
             ) -> tuple[Meta, dict[str, Callable[[Tensor], Tensor]]]:
    """The unpruned model first, then each configuration's view and the ``extra`` models (and, with
    ``compile``, each of them compiled too)."""
    cfgs = [Point(UNPRUNED), *[c for c in configs if c.plan != UNPRUNED]]
    views = {c.label: pruned_view(model, c) for c in cfgs}
    meta: Meta = {name: (c, False, views[name]) for name, c in zip(views, cfgs, strict=True)}
    for name, m in (extra or {}).items():
        meta[name] = (None, False, m)
    runners: dict[str, Callable[[Tensor], Tensor]] = {name: m for name, (_, _, m) in meta.items()}
    if compile:
        for name in list(meta):
            c, _, m = meta[name]
            meta[f"{name} [compiled]"] = (c, True, m)
            runners[f"{name} [compiled]"] = compile_model(m)
    return meta, runners


def benchmark_configs(
    model: nn.Module,
    configs: list[Point],
    x: Tensor,
    settings: BenchSettings = BenchSettings(),
    *,
    extra: Mapping[str, nn.Module] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    """Time the unpruned ``model`` and each configuration (and ``extra`` models) on batch ``x``.

    Any configuration ``eval`` takes (pruning by keep rate or budget, ToMe, ``best``, ...); all share
    the model's weights (``pruned_view``). With ``settings.compile`` every configuration is measured both
    eager and through ``torch.compile``. GMACs are per image, counted on the eager forward. Peak memory
    comes from one extra forward per configuration after the timed rounds (``forward_memory``);
    ``settings.memory=False`` skips it (the memory fields are then NaN).
    """
    say, st = progress or (lambda _msg: None), settings
    meta, runners = _runners(model, configs, extra, st.compile)
    # A compiled model compiles on its first call (and may once more when dynamo marks a size dynamic);
    # neither may land in a timed round.
    warmup = max(st.warmup, 2) if st.compile else st.warmup
    image = x[:1].float().to(next(model.parameters()).dtype)
    gmacs = {name: count_gmacs(m, image) for name, (_, _, m) in meta.items()}
    say(f"timing {len(runners)} configurations: {warmup} warm-up + {st.reps} interleaved rounds")
    with _compile_room(len(runners) if st.compile else 0):
        time_interleaved(runners, x, warmup=warmup, reps=0, dtype=st.dtype, progress=say)
        graphs = _compiled_graphs()
        timings = time_interleaved(runners, x, warmup=0, reps=st.reps, dtype=st.dtype, progress=say)
    late = _compiled_graphs() - graphs
    if st.compile and late:
        say(f"warning: torch.compile compiled {late} graph(s) during the timed rounds: the compiled timings "
            "include compilation")
    if st.memory:
        say("measuring peak memory")
    def runner(name: str):  # a compiled module's memory is measured compiled on CUDA only
        return runners[name] if meta[name][1] and x.is_cuda else meta[name][2]

    mems = {name: forward_memory(runner(name), x, st.dtype) if st.memory else ForwardMemory(0, [])
            for name in runners}  # fmt: skip
    rows = [_row(name, meta[name], timings, gmacs, mems, x.shape[0], st.memory) for name in timings]
    _pair_with_evit(rows, timings)
    return rows


def _row(name: str, meta: tuple, timings: dict, gmacs: dict, mems: dict, batch: int, memory: bool
         ) -> BenchRow:
    c, compiled, view = meta
    ref = "unpruned [compiled]" if compiled else "unpruned"
    t = timings[name]
    speedup = paired_ratio(timings[ref], t)
    g_ratio = gmacs[ref] / gmacs[name]
    info = _describe(c, view)
    peak, ref_peak = mems[name].peak, mems[ref].peak
    part, ref_part = mems[name].peak_from(info["pruned_from"]), mems[ref].peak_from(info["pruned_from"])
    return BenchRow(
        config=name, compiled=compiled, latency_ms=1e3 * t.median, latency_min_ms=1e3 * min(t.seconds),
        latency_max_ms=1e3 * max(t.seconds), spread=t.spread, images_per_s=batch / t.median, speedup=speedup,
        gmacs=gmacs[name], gmacs_ratio=g_ratio, efficiency=speedup / g_ratio,
        peak_mb=peak / 2**20 if memory else float("nan"),
        memory_ratio=peak / ref_peak if ref_peak else float("nan"),
        pruned_peak_mb=part / 2**20 if memory else float("nan"),
        pruned_memory_ratio=part / ref_part if ref_part else float("nan"),
        block_peaks_mb=[b / 2**20 for b in mems[name].block_peaks], **info,
    )  # fmt: skip


def _pair_with_evit(rows: list[BenchRow], timings: dict) -> None:
    """vs_evit: throughput against evit at the same keep rate (or budget), with the same fate of pruned
    tokens if measured, else dropped."""
    evit = {(r.keep_rate, r.budget, r.compiled, r.removed): r for r in rows if r.criterion == "evit"}
    for r in rows:
        at = (r.keep_rate, r.budget, r.compiled)
        ev = evit.get((*at, r.removed)) or evit.get((*at, "drop"))
        if ev is not None and r.criterion not in (None, "evit"):
            r.vs_evit = paired_ratio(timings[ev.config], timings[r.config])
