"""The package's layers only look down: no module imports one of a higher layer, and no import cycle.

The order is read from ``renyiprune._layers.LAYERS`` (the one place it is written down); every import of
every module is found with ``ast``, function-level imports included.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import renyiprune
from renyiprune._layers import LAYERS

ROOT = Path(renyiprune.__file__).parent
PKG = "renyiprune"


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([PKG, *parts])] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The renyiprune modules ``name`` imports anywhere in its file (a package counts as its __init__;
    ``from pkg import submodule`` counts the submodule only, as the parent packages are always loaded)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PKG)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != PKG:
                continue
            submodules = {f"{mod}.{a.name}" for a in node.names} & MODULES.keys()
            found.update(submodules)
            if len(submodules) < len(node.names):  # names defined in ``mod`` itself
                found.add(mod)
    return {m for m in found if m in MODULES and m != name}


def _rank(name: str) -> int | None:
    """Index in LAYERS of the layer ``name`` belongs to; None for the package root and __main__."""
    rel = name[len(PKG) + 1 :]
    if not rel or rel == "__main__":
        return None
    best = None
    for i, entry in enumerate(LAYERS):
        if rel == entry or rel.startswith(entry + "."):
            if best is None or len(entry) > len(LAYERS[best]):
                best = i
    if best is None:  # a package __init__: the highest layer inside it
        inside = [i for i, entry in enumerate(LAYERS) if entry.startswith(rel + ".")]
        best = max(inside) if inside else None
    return best


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    lost = [n for n in MODULES if _rank(n) is None and n not in (PKG, f"{PKG}.__main__")]
    assert not lost, f"modules outside every layer of renyiprune._layers.LAYERS: {lost}"


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{a} ({LAYERS[_rank(a)]}) imports {b} ({LAYERS[_rank(b)]})"
        for a, deps in GRAPH.items()
        for b in deps
        if _rank(a) is not None and _rank(b) is not None and _rank(b) > _rank(a)
    ]
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for n in sorted(GRAPH):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The walk must catch what it is there to catch: a lazy upward import inside a function."""
    f = tmp_path / "mod.py"
    f.write_text("def g():\n    from ..experiments import evaluate\n    from . import plans\n")
    deps = _imports(f"{PKG}.core.selection", f)
    assert f"{PKG}.core" not in deps
    assert f"{PKG}.experiments.evaluate" in deps and f"{PKG}.core.plans" in deps
    assert _rank(f"{PKG}.experiments.evaluate") > _rank(f"{PKG}.core.selection")


def test_layer_order_in_docs_matches_the_code():
    text = (ROOT.parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    positions = [text.find(f"`{entry}`") for entry in LAYERS if entry != "_layers"]
    assert -1 not in positions, "docs/architecture.md must name every layer of renyiprune._layers"
    assert positions == sorted(positions), "docs/architecture.md lists the layers in another order"


@pytest.mark.parametrize("package", ["renyiprune.core", "renyiprune"])
def test_importing_the_core_pulls_in_no_experiment_plotting_training_or_cli_code(package):
    code = (
        f"import sys, {package}\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[:2] in (['renyiprune', 'experiments'], "
        "['renyiprune', 'viz'], ['renyiprune', 'training'], ['renyiprune', 'cli']) "
        "or m.split('.')[0] in ('matplotlib', 'scipy', 'kornia', 'transformers', 'timm'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import {package} loaded: {out.stdout.strip()}"
