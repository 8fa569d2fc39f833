"""Every subcommand: each bad argument a user can type exits 2 with one clear error line, no traceback.

`eval` is covered end to end in test_cli_eval.py; here the others run in-process (fast), and a few
cases run as real processes to check that nothing but the message reaches the terminal.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from renyiprune.cli import main

NEEDS_DATA = {"sweep", "tune-alpha", "train", "visualize"}


@pytest.fixture(scope="module")
def weights(shared_assets):
    return str(shared_assets / "weights" / "deit_tiny_patch16_224.safetensors")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """data: six images with a labels.tsv; empty: no images; badtsv: a labels.tsv with a bad row."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    data.mkdir()
    for i in range(6):  # enough for tune-alpha's calibration/evaluation split to have both halves
        Image.new("RGB", (40, 30), (i * 40, 20, 200)).save(data / f"img{i}.png")
    (data / "labels.tsv").write_text("".join(f"img{i}.png\t{i}\n" for i in range(6)))
    (root / "empty").mkdir()
    bad = root / "badtsv"
    bad.mkdir()
    Image.new("RGB", (40, 30)).save(bad / "a.png")
    (bad / "labels.tsv").write_text("a.png\tnot-a-number\n")
    return {name: str(root / name) for name in ("data", "empty", "badtsv")} | {"root": root}


def base_args(cmd: str, weights: str, dirs: dict, data: str | None = None) -> list[str]:
    """A complete command line for ``cmd`` that only the added bad argument breaks (last value wins)."""
    out = str(dirs["root"] / f"out-{cmd}")
    data = data or dirs["data"]
    return {
        "bench": ["bench", "--model", "deit_tiny_patch16_224", "--batch-size", "1", "--reps", "1"],
        "sweep": ["sweep", "--weights", weights, "--data", data, "--out", out, "--no-progress"],
        "tune-alpha": ["tune-alpha", "--weights", weights, "--data", data, "--out", out, "--no-progress"],
        "visualize": ["visualize", "--weights", weights, "--data", data, "--out", out, "--no-progress"],
        "train": ["train", "--weights", weights, "--dataset", "labels-tsv", "--data-root", data, "--out", out,
                  "--no-progress"],  # fmt: skip
        "export": ["export", "--weights", weights, "--onnx", str(dirs["root"] / "m.onnx")],
        "convert": ["convert", weights, str(dirs["root"] / "hf"), "--to", "hf"],
    }[cmd]


def check(args: list[str], needle: str, capsys) -> None:
    try:
        rc = main(args)
    except SystemExit as e:  # argparse rejects a value while parsing
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, (args, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err  # one error line: argparse's usage block is not printed above it
    assert re.search(needle, lines[0], re.IGNORECASE), err
    assert "Traceback" not in err


TYPED = [  # (bad arguments, what the message must name), for every command taking that option
    (["--model", "resnet50"], "model"),
    (["--alpha", "-1"], "alpha"),
    (["--keep", "0"], "keep"),
    (["--keep", "1.5"], "keep"),
    (["--locations", "9,3"], "locations"),
    (["--locations", "3,12"], "out of range"),
    (["--weights", "/nonexistent/w.safetensors"], "no such file"),
]
OPTIONS = {  # which option names each command has (one spelling each: docs/cli.md, "Flag vocabulary")
    "bench": {"--model", "--alpha", "--keep", "--locations", "--weights"},
    "sweep": {"--model", "--alpha", "--keep", "--locations", "--weights"},
    "tune-alpha": {"--model", "--alpha", "--keep", "--locations", "--weights"},
    "visualize": {"--model", "--alpha", "--keep", "--locations", "--weights"},
    "train": {"--model", "--alpha", "--keep", "--locations", "--weights"},
    "export": {"--model", "--alpha", "--keep", "--locations", "--weights"},
    "convert": {"--model"},
}
CASES = []
for _cmd, _opts in OPTIONS.items():
    for _bad, _needle in TYPED:
        if _bad[0] in _opts:
            CASES.append((_cmd, _bad, _needle))


@pytest.mark.parametrize("cmd,bad,needle", CASES, ids=[f"{c}{' '.join(b)}" for c, b, _ in CASES])
def test_bad_option_values(cmd, bad, needle, weights, dirs, capsys):
    check(base_args(cmd, weights, dirs) + bad, needle, capsys)


@pytest.mark.parametrize("cmd", sorted(NEEDS_DATA))
@pytest.mark.parametrize("which,needle", [
    ("missing", "no such file|does not exist"),
    ("empty", "no images|no labels.tsv"),
    ("badtsv", "class_index"),
])  # fmt: skip
def test_bad_data_folders(cmd, which, needle, weights, dirs, capsys):
    data = str(dirs["root"] / "missing") if which == "missing" else dirs[which]
    check(base_args(cmd, weights, dirs, data=data), needle, capsys)


@pytest.mark.parametrize("args,needle", [
    (["export", "--criterion", "bogus"], "unknown criterion"),
    (["export", "--onnx", "model.txt"], ".onnx"),
    (["bench", "--criterion", "bogus"], "unknown criterion"),
    (["bench", "--batch-size", "0"], "batch-size"),
    (["bench", "--budget", "1.5"], "budget"),
    (["train", "--criterion", "bogus"], "unknown criterion"),
    (["train", "--epochs", "0"], "epochs"),
    (["sweep", "--criterion", "bogus"], "unknown criterion"),
    (["sweep", "--lambda", "2"], "lambda"),
    (["sweep", "--budget", "0"], "budget"),
    (["sweep", "--budget", "0.5,renyi"], "budget"),
    (["visualize", "--keep", "0.5,0.7"], "one keep rate"),
    (["visualize", "--format", "gif"], "format"),
    (["download", "imagenet"], "invalid choice"),
])  # fmt: skip
def test_other_bad_arguments(args, needle, weights, dirs, capsys):
    cmd = args[0]
    full = base_args(cmd, weights, dirs) + args[1:] if cmd != "download" else [*args, "--root", "x"]
    check(full, needle, capsys)


def test_convert_bad_inputs(weights, dirs, tmp_path, capsys):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    check(["convert", str(garbage), str(tmp_path / "hf"), "--to", "hf"], "corrupt|not a PyTorch", capsys)
    check(["convert", weights, str(tmp_path / "hf"), "--to", "hf", "--model", "deit_small_patch16_224"],
          "mis-shaped", capsys)  # fmt: skip
    (tmp_path / "file").write_text("x")
    check(["convert", weights, str(tmp_path / "file"), "--to", "hf"], "is a file", capsys)
    check(["convert", str(tmp_path / "nothing"), str(tmp_path / "o"), "--to", "hf"], "no such file", capsys)
    check(["convert", weights, str(tmp_path / "o.bin"), "--to", "renyiprune"], "Hugging Face", capsys)
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())


@pytest.mark.parametrize("args,needle", [
    (["bench", "--keep", "1.5"], "keep rate"),
    (["sweep", "--data", "/nonexistent", "--out", "x"], "no such file"),
    (["convert", "/nonexistent.safetensors", "out", "--to", "hf"], "no such file"),
])  # fmt: skip
def test_real_process_prints_only_the_message(args, needle):
    p = subprocess.run([sys.executable, "-m", "renyiprune", *args], capture_output=True, text=True)
    assert p.returncode == 2 and needle in p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith(f"renyiprune {args[0]}: error: ")


def test_download_help_lists_every_named_data_set(capsys):
    """The help lines come from data.datasets' registry: all four named data sets, none left out."""
    from renyiprune.data.datasets import DOWNLOADS, NAMED_DATASETS

    assert set(NAMED_DATASETS) == {"flowers102", "fgvc-aircraft", "imagenet100", "stanford-cars"}
    with pytest.raises(SystemExit):
        main(["--help"])
    top = " ".join(capsys.readouterr().out.split())
    line = top[top.index("download ") :]
    with pytest.raises(SystemExit):
        main(["download", "--help"])
    own = " ".join(capsys.readouterr().out.split())
    for name in NAMED_DATASETS:
        assert name in line.split(" export")[0] and name in own
    assert all(name in DOWNLOADS for name in ("flowers102", "fgvc-aircraft"))


def test_visualize_failing_midway_leaves_out_as_it_was(weights, tmp_path, capsys):
    """The first image's figures are rendered before the second (corrupt) one stops the run: none of them,
    and no index.html, reach --out, whose earlier content is untouched."""
    import tempfile

    good, bad = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(good)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("kept")
    scratch = lambda: set(Path(tempfile.gettempdir()).glob("renyiprune-visualize-*"))  # noqa: E731
    before = scratch()
    args = ["visualize", "--weights", weights, str(good), str(bad), "--batch-size", "1", "--alpha", "2",
            "--criterion", "evit", "--out", str(out), "--no-progress"]  # fmt: skip
    check(args, "cannot read image", capsys)
    assert [p.name for p in out.iterdir()] == ["earlier.txt"]
    assert (out / "earlier.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "out"]
    assert scratch() == before  # the scratch folder is gone too
