"""``--resume`` continues the run the checkpoint holds, or refuses: it never changes the run silently.

A checkpoint stores the configuration it was trained with. Resuming compares every setting that
decides what is trained (pruning criterion, α, keep rate, locations, fusion, frozen blocks, transform,
head, data split, schedule, regularisation, seed, number of processes) with the command's; any
difference stops the run with a ValueError that lists each one as the checkpoint's value against the
command's. Only operational settings may change on resume (:data:`MAY_CHANGE`), and ``--epochs`` may
grow: that extends the run (``train`` recomputes the schedule over the new length), as timm users expect.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

__all__ = ["MAY_CHANGE", "config_record", "resume_mismatches", "check_resume"]

#: Settings a resumed run may change: where things are and how the work is run, not what is trained.
MAY_CHANGE = frozenset({
    "out", "data_root", "weights", "pretrained", "head_cache", "resume", "progress", "workers", "device",
    "threads", "dist_timeout", "max_steps", "save_every", "eval_every", "eval_before", "eval_keep",
    "skip_bad",
})  # fmt: skip


def config_record(cfg) -> dict:
    """The configuration as a checkpoint stores it (JSON values: tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resume_mismatches(stored: dict, cfg, world_size: int, stored_world_size: int | None) -> list[str]:
    """One line per setting where the checkpoint's configuration ``stored`` differs from ``cfg``.

    A setting missing from ``stored`` (a checkpoint older than the setting) counts as its default.
    """
    now = config_record(cfg)
    defaults = {}
    for f in dataclasses.fields(cfg):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    defaults = json.loads(json.dumps(defaults, default=str))
    out = []
    for name, value in now.items():
        if name in MAY_CHANGE:
            continue
        old = stored.get(name, defaults.get(name))
        if name == "epochs" and isinstance(old, int) and value > old:
            continue  # extends the run
        if old != value:
            why = " (on resume --epochs may only grow, to extend the run)" if name == "epochs" else ""
            out.append(f"{_flag(name)}: checkpoint {old!r}, this command {value!r}{why}")
    if stored_world_size is not None and stored_world_size != world_size:
        out.append(f"processes: checkpoint {stored_world_size}, this command {world_size}")
    return out


def check_resume(path: str | Path, state: dict, cfg, world_size: int) -> None:
    """Raise ValueError naming every difference between the checkpoint ``state`` and the command."""
    diffs = resume_mismatches(state.get("config", {}), cfg, world_size, state.get("world_size"))
    if diffs:
        raise ValueError(
            f"--resume: {path} was trained with other settings than this command asks for:\n  "
            + "\n  ".join(diffs)
            + "\nA resumed run keeps its settings: repeat the original ones, or start a new run in another "
            "--out."
        )
