"""Pruning configurations as text and JSON: what the command line, sweeps and policy files name.

``PruneConfig`` is one configuration as the ``eval``/``sweep`` commands list it (criterion name, keep
rate, alpha, locations, options); ``parse_stages`` reads a per-stage criterion ``renyi:2@3+evit@6``;
``config_to_dict``/``config_from_dict`` are the JSON form sweeps record and policies ship;
``patch_kwargs`` turns a configuration into ``renyiprune.patch`` arguments.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..core.criteria import list_criteria, make_criterion, takes_alpha
from ..core.entropy import parse_alpha

__all__ = [
    "PruneConfig", "SweepConfig", "parse_stages", "parse_options", "split_criterion", "check_options",
    "PATCH_OPTIONS", "patch_kwargs", "config_to_dict", "config_from_dict",
]  # fmt: skip


def parse_options(text: str) -> dict:
    """'base=headvar;norm=4' -> {'base': 'headvar', 'norm': 4}; numbers and true/false are converted."""
    out: dict = {}
    for item in filter(None, (t.strip() for t in text.split(";"))):
        k, eq, v = item.partition("=")
        if not eq:
            raise ValueError(f"criterion option {item!r} needs the form key=value")
        low = v.strip().lower()
        if low in ("true", "false"):
            out[k.strip()] = low == "true"
            continue
        for conv in (int, float):
            try:
                out[k.strip()] = conv(v)
                break
            except ValueError:
                continue
        else:
            out[k.strip()] = v.strip()
    return out


def split_criterion(spec: str) -> tuple[str, dict]:
    """'renyi[cls_key=exclude;heads=pooled]' -> ('renyi', {'cls_key': 'exclude', 'heads': 'pooled'}):
    the one criterion-with-options grammar every command accepts (a bare name has no options)."""
    spec = spec.strip()
    if "[" in spec:
        if not spec.endswith("]"):
            raise ValueError(f"criterion {spec!r}: options go in brackets at the end: renyi[heads=pooled]")
        name, _, inner = spec[:-1].partition("[")
        return name.strip(), parse_options(inner)
    return spec, {}


#: Bracket options that ``renyiprune.patch`` itself reads (what happens to pruned tokens, the schedule);
#: every other option goes to the criterion.
PATCH_OPTIONS = frozenset({"removed", "fusion", "budget", "tokens"})


def check_options(name: str, options: dict) -> None:
    """Bind the criterion options among ``options`` to registered criterion ``name`` now (``make_criterion``),
    so that a misspelt option fails with its one-line message before any model is loaded or any image is
    read. Names that are no registered criterion (tome, best, per-stage specs) are left to their readers."""
    if name in list_criteria():
        make_criterion(name, **{k: v for k, v in options.items() if k not in PATCH_OPTIONS})


def parse_stages(spec: str) -> tuple[list[str], list[float], tuple[int, ...]]:
    """Parse a per-stage criterion ``renyi:2@3+evit@6+evit@9`` (``name[:alpha]@block`` joined by ``+``)
    into per-location criteria, alphas (1 where none is given) and locations."""
    crits, alphas, locs = [], [], []
    for part in spec.split("+"):
        head, at, loc = part.strip().partition("@")
        if not at or not loc.strip().isdigit():
            raise ValueError(f"per-stage criterion {part!r} needs name[:alpha]@block, e.g. renyi:2@3")
        name, _, a = head.partition(":")
        if name not in list_criteria():
            raise ValueError(f"unknown criterion {name!r} in {spec!r}; known: {', '.join(list_criteria())}")
        crits.append(name)
        alphas.append(parse_alpha(a) if a else 1.0)
        locs.append(int(loc))
    if locs != sorted(set(locs)):
        raise ValueError(f"per-stage locations must increase: {spec!r}")
    return crits, alphas, tuple(locs)


@dataclass(frozen=True)
class PruneConfig:
    """Arguments of ``renyiprune.patch``; ``criterion=None`` means the unpruned model.

    A criterion containing ``@`` is a per-stage spec (``parse_stages``); its locations replace
    ``locations``. ``options`` go to every stage's criterion.
    """

    criterion: str | None = "renyi"
    keep_rate: float = 0.7
    alpha: float = 1.0
    locations: tuple[int, ...] = (3, 6, 9)
    fuse: bool = False
    options: tuple[tuple[str, object], ...] = ()

    @property
    def label(self) -> str:
        if self.criterion is None:
            return "unpruned"
        text = self.criterion
        opts = dict(self.options)
        if takes_alpha(self.criterion, opts):
            text += f" a={self.alpha:g}"
        text += "".join(f" {k}={v}" for k, v in opts.items() if k not in ("budget", "removed", "tokens"))
        if "budget" in opts:
            text += f" budget={opts['budget']:g}"
        elif "tokens" in opts:
            text += f" tokens={','.join(str(t) for t in opts['tokens'])}"
        elif self.criterion != "tome":
            text += f" r={self.keep_rate:g}"
        removed = opts.get("removed", "fuse" if self.fuse else "drop")
        return text + ("" if removed == "drop" or self.criterion == "tome" else f" +{removed}")


def patch_kwargs(config: PruneConfig) -> dict:
    """The keyword arguments of ``renyiprune.patch`` that ``config`` stands for (empty: unpruned)."""
    if config.criterion is None:
        return {}
    opts = dict(config.options)
    if "tokens" in opts and isinstance(opts["tokens"], list):
        opts["tokens"] = tuple(opts["tokens"])
    if config.criterion == "tome":  # token merging: no criterion; r (or a budget) in the options
        return {"method": "tome", **opts}
    crit, alpha, locs = config.criterion, config.alpha, config.locations
    if "@" in crit:
        crit, alpha, locs = parse_stages(crit)
    return dict(keep_rate=config.keep_rate, criterion=crit, alpha=alpha, locations=locs, fuse=config.fuse,
                **opts)


@dataclass(frozen=True)
class SweepConfig(PruneConfig):
    """A ``PruneConfig`` plus ``budget``: per-image adaptive keep instead of a fixed rate."""

    budget: bool = False

    @property
    def label(self) -> str:
        text = super().label
        return text.replace(" r=", " budget r=", 1) if self.budget else text

    @property
    def prune_config(self) -> PruneConfig:
        d = {k: v for k, v in asdict(self).items() if k != "budget"}
        return PruneConfig(**d)


def _fusion_of(fuse: bool, options: dict) -> str | None:
    """The fusion rule of a fused config (``options['fusion']``, default EViT's); None if not fused."""
    fused = options.get("removed", "fuse" if fuse else "drop") == "fuse"
    return options.get("fusion", "evit") if fused else None


def config_to_dict(c: PruneConfig) -> dict:
    """JSON-safe dict of a config (alpha inf as the string "inf"); a fused one names its fusion rule,
    so that records of the two rules never stand for each other."""
    d = asdict(c)
    d["alpha"] = "inf" if math.isinf(c.alpha) else c.alpha
    d["locations"] = list(c.locations)
    d["options"] = {k: "inf" if isinstance(v, float) and math.isinf(v) else v for k, v in c.options}
    d.setdefault("budget", False)
    fusion = _fusion_of(c.fuse, d["options"]) if c.criterion not in (None, "tome") else None
    if fusion is not None:
        d["fusion"] = fusion
    return d


def config_from_dict(d: dict) -> SweepConfig:
    """Inverse of ``config_to_dict``."""
    opts = {k: tuple(v) if isinstance(v, list) else float(v) if v == "inf" else v
            for k, v in d.get("options", {}).items()}
    if d["criterion"] not in (None, "tome") and _fusion_of(bool(d["fuse"]), opts) is not None:
        # records written before EViT's rule became the default name none: they used "renorm"
        fusion = d.get("fusion", "renorm")
        opts.pop("fusion", None)
        if fusion != "evit":
            opts["fusion"] = fusion
    return SweepConfig(
        criterion=d["criterion"],
        keep_rate=float(d["keep_rate"]),
        alpha=float(d["alpha"]),
        locations=tuple(int(i) for i in d["locations"]),
        fuse=bool(d["fuse"]),
        options=tuple(sorted(opts.items())),
        budget=bool(d.get("budget", False)),
    )
