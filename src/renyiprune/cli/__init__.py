"""The ``renyiprune`` command: one module per subcommand, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from ..utils.io import OutputInUse
from . import bench as bench_cmd
from . import common
from . import convert as convert_cmd
from . import download as download_cmd
from . import eval as eval_cmd
from . import export as export_cmd
from . import probe as probe_cmd
from . import sweep as sweep_cmd
from . import train as train_cmd
from . import tune as tune_cmd
from . import tune_budget as tune_budget_cmd
from . import visualize as visualize_cmd

COMMANDS = [bench_cmd, eval_cmd, sweep_cmd, tune_cmd, tune_budget_cmd, visualize_cmd, train_cmd, download_cmd]
COMMANDS += [export_cmd, convert_cmd, probe_cmd]


class Parser(argparse.ArgumentParser):
    """argparse's parser (and, through ``add_subparsers``, every subcommand's) with one-line errors:
    ``renyiprune eval: error: argument --keep: ...`` and status 2, without the usage block above it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {common.one_line(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="renyiprune",
        description="Prune ViT patch tokens by the Rényi entropy of their attention, and measure it.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {common.version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS:
        cmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (*common.USER_ERRORS, OutputInUse) as e:  # OutputInUse: another process writes to OUT
        print(f"renyiprune {args.command}: error: {common.one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("renyiprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
