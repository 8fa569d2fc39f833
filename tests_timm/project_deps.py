"""Print the project's runtime dependencies from pyproject.toml, one a line, all but torch.

``make test-timm`` installs these beside PyPI's torch 2.14.1 and then the project itself with
``--no-deps``: the project's ``torch<2.14`` bound (there to keep the CPU build in the main
environment) would otherwise make pip swap that torch for an older one.
"""

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the TOML reader that pip itself ships
    from pip._vendor import tomli as tomllib


def runtime_deps(pyproject: Path) -> list[str]:
    """``[project] dependencies`` of ``pyproject`` without the torch requirement."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [d for d in deps if re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0].lower() != "torch"]


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    sys.stdout.write("".join(f"{d}\n" for d in runtime_deps(root / "pyproject.toml")))
