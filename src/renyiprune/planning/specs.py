"""The criterion grammar of the command line: ``renyi[heads=pooled]`` options, per-stage specs.

``split_criterion`` reads a criterion with bracket options, ``parse_options`` the options themselves,
``parse_stages`` (``core.plans``) a per-stage criterion ``renyi:2@3+evit@6``; ``check_options`` binds the
options to the criterion before any model is loaded. What they describe becomes a plan
(``planning.build.build_plan``).
"""

from __future__ import annotations

from ..core.criteria import list_criteria, make_criterion
from ..core.plans import parse_stages

__all__ = ["parse_stages", "parse_options", "split_criterion", "check_options", "PATCH_OPTIONS"]


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
