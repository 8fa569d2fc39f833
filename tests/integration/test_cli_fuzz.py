"""Fuzz-style table of bad command lines: every subcommand, each flag with bad values (empty, NaN, negative,
huge, wrong type, a missing file, a folder or a corrupt file where a file is expected, a wrong model).

Each case must exit with status 2 and exactly one non-empty stderr line that names the flag (or the
file), no traceback, and leave the folder its outputs would go to untouched. The errors all come
before any model forward (the cases cost an argument parse, or at most reading the weights).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from renyiprune.cli import main

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = REPO / "demo" / "weights" / "deit_tiny_patch16_224.safetensors"
DATA = REPO / "demo" / "imagenet-100"  # real images with a labels.tsv; only read

# Placeholders in the tables below, filled in per test (``paths``).
MISSING, FOLDER, CORRUPT, TEXT = "{missing}", "{folder}", "{corrupt}", "{text}"


def base_args(cmd: str, out: Path) -> list[str]:
    """A complete, cheap command line for ``cmd`` that writes only under ``out``; a case appends one bad
    ``--flag=value`` (the last value of an option wins)."""
    w, d = str(WEIGHTS), str(DATA)
    quick = ["--no-progress", "--workers=0", "--limit=6"]
    return {
        "eval": ["eval", "--weights", w, "--data", d, *quick, "--criterion=evit"],
        "probe": ["probe", "--weights", w, "--train", d, "--eval", d, "--cache", str(out / "cache"), *quick,
                  "--criterion=evit"],  # fmt: skip
        "sweep": ["sweep", "--weights", w, "--data", d, "--out", str(out / "out"), *quick, "--criterion=evit",
                  "--keep=0.7", "--alpha=1"],  # fmt: skip
        "tune-alpha": ["tune-alpha", "--weights", w, "--data", d, "--out", str(out / "out"), *quick,
                       "--criterion=renyi", "--keep=0.7", "--alpha=1"],  # fmt: skip
        "tune-budget": ["tune-budget", "--weights", w, "--data", d, "--out", str(out / "out"), *quick,
                        "--criterion=evit", "--budget=0.7"],  # fmt: skip
        "visualize": ["visualize", "--weights", w, "--data", d, "--out", str(out / "out"), "--no-progress",
                      "--limit=1", "--alpha=1", "--criterion=evit", "--image-figures=0"],  # fmt: skip
        "bench": ["bench", "--batch-size=1", "--reps=1", "--warmup=0", "--image-size=32", "--keep=0.7",
                  "--criterion=evit"],  # fmt: skip
        "train": ["train", "--weights", w, "--dataset", "labels-tsv", "--data-root", d, "--out",
                  str(out / "out"), *quick, "--epochs=1", "--max-steps=1", "--no-eval-before",
                  "--eval-every=0"],  # fmt: skip
        "export": ["export", "--weights", w, "--onnx", str(out / "m.onnx")],
        "convert": ["convert", w, str(out / "hf"), "--to", "hf"],
        "download": ["download", "flowers102", "--root", str(out / "root")],
    }[cmd]


# Bad values per flag, for every command that takes the flag.
EMPTY = ["", ","]
KEEP = [*EMPTY, "nan", "-0.5", "0", "1e9", "abc"]
ALPHA = [*EMPTY, "nan", "-1", "1e300", "abc"]
CRITERION = [*EMPTY, "bogus", "renyi[bogus=1]"]
LOCATIONS = ["", "none", "9,3", "3,3", "-1", "3,99", "a,b"]
BUDGET = [*EMPTY, "nan", "0", "1.5", "-1"]
MODEL = ["", "resnet50"]
WRONG_MODEL = [*MODEL, "deit_small_patch16_224"]  # a registered model the DeiT-Tiny weights do not fit
WEIGHTS_BAD = ["", MISSING, FOLDER, CORRUPT]
COUNT = ["0", "-1", "1.5", "x"]  # an integer >= 1
SEED = ["-1", "x", str(2**70)]
FINITE = ["nan", "inf", "x"]

PRUNING = {"--keep": KEEP, "--alpha": ALPHA, "--criterion": CRITERION, "--locations": LOCATIONS}
CONFIG = {  # eval's pruning configuration flags, shared by probe
    **PRUNING, "--budget": BUDGET, "--tokens": [*EMPTY, "0", "-3", "x"], "--tome-r": [*EMPTY, "-1", "x"],
    "--entropy-weight": FINITE, "--seed": SEED, "--policy": ["", MISSING, FOLDER, CORRUPT],
}  # fmt: skip
MODEL_ARGS = {"--model": WRONG_MODEL, "--weights": WEIGHTS_BAD, "--threads": ["0", "-2", "x"]}
IMAGES = {"--data": ["", MISSING, TEXT], "--data-root": ["", MISSING, TEXT], "--dataset": ["bogus"]}
LOADER = {"--limit": COUNT, "--batch-size": COUNT, "--workers": ["-1", "x"]}

FLAGS: dict[str, dict[str, list[str]]] = {
    "eval": {**MODEL_ARGS, **IMAGES, **LOADER, **CONFIG},
    "probe": {**MODEL_ARGS, **LOADER, **CONFIG, "--l2": [*EMPTY, "0", "-1", "nan", "inf"],
              "--train": ["", MISSING, TEXT], "--eval": ["", MISSING, TEXT],
              "--data-root": ["", MISSING, TEXT], "--cache": ["", TEXT]},
    "sweep": {**MODEL_ARGS, **IMAGES, **LOADER, **PRUNING, "--budget": ["", "nan", "0", "1.5", "-1"],
              "--lambda": [*EMPTY, "nan", "2", "-1"], "--fuse": ["", "maybe"], "--adaptive": EMPTY,
              "--out": ["", TEXT]},
    "tune-alpha": {**MODEL_ARGS, **IMAGES, **LOADER, **PRUNING, "--lambda": [*EMPTY, "nan", "2"],
                   "--fuse": ["", "maybe"], "--out": ["", TEXT], "--policy-out": ["", FOLDER]},
    "tune-budget": {**MODEL_ARGS, **IMAGES, **LOADER, "--locations": LOCATIONS, "--budget": BUDGET,
                    "--criterion": CRITERION, "--base-policy": ["", MISSING, FOLDER, CORRUPT],
                    "--out": ["", TEXT], "--policy-out": ["", FOLDER]},
    "visualize": {**MODEL_ARGS, **IMAGES, **PRUNING, "--blocks": ["", "9,3", "12"], "--limit": COUNT,
                  "--batch-size": COUNT, "--image-figures": ["-1", "x"], "--seed": SEED,
                  "--format": [*EMPTY, "gif"], "--out": ["", TEXT]},
    "bench": {"--model": MODEL, "--weights": WEIGHTS_BAD, "--threads": ["0", "x"], **PRUNING,
              "--budget": BUDGET, "--tokens": [*EMPTY, "0", "x"], "--tome-r": [*EMPTY, "-1"],
              "--entropy-weight": FINITE, "--seed": SEED, "--policy": [MISSING, FOLDER, CORRUPT],
              "--batch-size": COUNT, "--image-size": COUNT, "--warmup": ["-1", "x"], "--reps": COUNT},
    "train": {**MODEL_ARGS, "--model": MODEL, "--data-root": [MISSING, TEXT], "--dataset": ["bogus"],
              "--limit": COUNT, **PRUNING, "--eval-keep": KEEP, "--num-classes": COUNT,
              "--freeze-blocks": ["-1", "x"], "--crop-scale": ["0", "2", "nan"], "--epochs": COUNT,
              "--batch-size": COUNT,
              "--lr": ["0", "-1", *FINITE], "--min-lr": ["-1", "nan"], "--warmup-lr": ["-1", "nan"],
              "--warmup-epochs": ["-1", "inf"], "--weight-decay": ["-1", "nan"], "--clip-grad": ["-1", "nan"],
              "--smoothing": ["1", "-0.1", "nan"], "--mixup": ["-1", "nan"], "--cutmix": ["-1", "inf"],
              "--randaug-n": ["-1", "x"], "--randaug-m": ["11", "-1", "nan"], "--reprob": ["2", "nan"],
              "--drop-path": ["1", "nan"], "--ema-decay": ["1", "-0.5", "nan"], "--save-every": ["-1"],
              "--max-steps": COUNT, "--eval-every": ["-1"], "--seed": SEED, "--workers": ["-1"],
              "--dist-timeout": ["0", "nan", "inf"], "--out": ["", TEXT]},
    "export": {**MODEL_ARGS, **PRUNING, "--tolerance": ["-1", *FINITE], "--onnx": ["", "model.txt"]},
    "convert": {"--model": WRONG_MODEL, "--to": ["onnx"]},
    "download": {"--root": ["", TEXT]},
}  # fmt: skip

# Positional arguments, replaced in the base command line: (command, position, bad values); the line names
# the value, or for an empty one the argument's name.
POSITIONAL_NAMES = {("convert", 1): "input", ("convert", 2): "output", ("download", 1): "dataset"}
POSITIONAL = [("convert", 1, ["", MISSING, FOLDER, CORRUPT]), ("convert", 2, [""]),
              ("download", 1, ["", "bogus", "imagenet"])]
# Whole bad command lines (the placeholders filled in as for flags), with what the line must name.
WHOLE = [
    (["visualize", "--weights", str(WEIGHTS), "--out", "{out}", "--no-progress", MISSING], MISSING),
    (["visualize", "--weights", str(WEIGHTS), "--out", "{out}", "--no-progress", FOLDER], FOLDER),
    (["visualize", "--weights", str(WEIGHTS), "--out", "{out}", "--no-progress", CORRUPT], CORRUPT),
    (["visualize", "--weights", str(WEIGHTS), "--out", "{out}", "--no-progress", ""], "IMAGE"),
    (["download", "stanford-cars", "--root", "{out}"], "Stanford Cars"),
    (["download", "imagenet100", "--root", "{out}"], "ImageNet"),
    ([], "COMMAND"),
    (["bogus"], "bogus"),
]

CASES = [
    pytest.param(cmd, flag, value, id=f"{cmd} {flag}={value or 'EMPTY'}")
    for cmd, flags in FLAGS.items()
    for flag, values in flags.items()
    for value in values
]


@pytest.fixture(autouse=True)
def no_forward(monkeypatch):
    """Every case must stop before the first model forward: a patch embedding that runs fails it."""
    from renyiprune.models.model import PatchEmbed

    def refuse(self, x):
        raise AssertionError("a model forward ran before the bad argument was refused")

    monkeypatch.setattr(PatchEmbed, "forward", refuse)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The paths that stand for the placeholders, outside each test's tmp_path."""
    if not WEIGHTS.is_file():
        pytest.fail(f"{WEIGHTS} is part of the repository")
    root = tmp_path_factory.mktemp("fuzz-files")
    (root / "folder").mkdir()
    (root / "corrupt.bin").write_bytes(b"\x89PNG\r\n\x1a\n" + b"neither weights nor json nor an image" * 8)
    (root / "text.txt").write_text("a file, not a folder\n")
    return {MISSING: str(root / "missing"), FOLDER: str(root / "folder"), CORRUPT: str(root / "corrupt.bin"),
            TEXT: str(root / "text.txt")}  # fmt: skip


def fill(args: list[str], files: dict[str, str], out: Path) -> list[str]:
    return [a.replace("{out}", str(out / "out")) if a == "{out}" else files.get(a, a) for a in args]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: exit(2) after printing its message
        rc = e.code
    except Exception as e:  # noqa: BLE001  (in a real process: a traceback)
        pytest.fail(f"{argv}: uncaught {type(e).__name__}: {e}")
    return rc, capsys.readouterr().err


def check_one_line(rc: int, err: str, needle: str | tuple[str, ...], argv: list[str]) -> None:
    """Status 2 and one stderr line, ``renyiprune ...``, holding ``needle`` (or one of several)."""
    needles = (needle,) if isinstance(needle, str) else needle
    assert rc == 2, (argv, rc, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"{argv}: stderr has {len(lines)} lines:\n{err}"
    assert lines[0].startswith("renyiprune"), lines[0]
    assert any(n in lines[0] for n in needles), f"{argv}: the line names none of {needles}: {lines[0]}"


@pytest.mark.parametrize("cmd, flag, value", CASES)
def test_bad_flag_value(cmd, flag, value, files, tmp_path, capsys):
    out = tmp_path
    path = files.get(value)
    if value == TEXT and flag in ("--out", "--root", "--cache"):  # an output folder that is a file
        path = str(out / "out")
        Path(path).write_text("x")
    argv = [*base_args(cmd, out), f"{flag}={path or value}"]
    needle = (flag, path) if path else flag  # the flag, or the file it names
    before = snapshot(out)
    rc, err = run_in_process(argv, capsys)
    check_one_line(rc, err, needle, argv)
    assert snapshot(out) == before, f"{argv} wrote {sorted(set(snapshot(out)) - set(before))}"


POSITIONAL_CASES = [pytest.param(cmd, i, v, id=f"{cmd} arg{i}={v}") for cmd, i, vs in POSITIONAL for v in vs]


@pytest.mark.parametrize("cmd, position, value", POSITIONAL_CASES)
def test_bad_positional_argument(cmd, position, value, files, tmp_path, capsys):
    argv = base_args(cmd, tmp_path)
    argv[position] = files.get(value, value)
    rc, err = run_in_process(argv, capsys)
    check_one_line(rc, err, argv[position] or f"argument {POSITIONAL_NAMES[cmd, position]}", argv)
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize("args, needle", WHOLE, ids=[" ".join(a[:1] + a[-1:]) or "none" for a, _ in WHOLE])
def test_bad_command_line(args, needle, files, tmp_path, capsys):
    argv = fill(args, files, tmp_path)
    rc, err = run_in_process(argv, capsys)
    check_one_line(rc, err, files.get(needle, needle), argv)
    assert snapshot(tmp_path) == {}


SUBPROCESS = [
    ["eval", "--weights", str(WEIGHTS), "--data", str(DATA), "--keep="],
    ["sweep", "--weights", str(WEIGHTS), "--data", str(DATA), "--out", "{out}", "--alpha=nan"],
    ["visualize", "--weights", FOLDER, "--out", "{out}", str(DATA / "images" / "n01440764_tench.JPEG")],
    ["train", "--weights", str(WEIGHTS), "--data-root", str(DATA), "--out", "{out}", "--lr=nan"],
    ["convert", CORRUPT, "{out}", "--to", "hf"],
    ["bench", "--locations="],
]


@pytest.mark.parametrize("args", SUBPROCESS, ids=[a[0] for a in SUBPROCESS])
def test_real_process_prints_one_line(args, files, tmp_path):
    """In a real process nothing but the one line reaches the terminal: no usage block, no traceback."""
    argv = fill(args, files, tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "renyiprune", *argv], capture_output=True, text=True, env=env,
                       timeout=300)  # fmt: skip
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert len(lines) == 1 and lines[0].startswith(f"renyiprune {argv[0]}: error: "), p.stderr
    assert p.stdout == ""
    assert snapshot(tmp_path) == {}
