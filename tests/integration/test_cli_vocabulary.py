"""One command-line vocabulary: ``--criterion``, ``--alpha``, ``--keep`` and ``--budget`` parse to the same
values, under the same names, in every command that takes them; the old spellings still parse to the
same thing and stay out of ``--help``; ``sweep --budget`` is a GMACs budget and ``--adaptive`` the
per-image adaptive mode. Only the real parser (``renyiprune.cli.build_parser``) is used; nothing runs.
"""

from __future__ import annotations

import argparse
import inspect
import math
from dataclasses import fields

import pytest
from PIL import Image

import renyiprune as rp
from renyiprune.cli import build_parser
from renyiprune.cli import eval as eval_cmd
from renyiprune.cli import visualize as visualize_cmd
from renyiprune.cli.images import grid_of
from renyiprune.experiments.grid import grid_points
from renyiprune.planning.build import PatchArgs, build_plan

#: What each command needs besides the flags under test (paths are not opened while parsing, except
#: ``--data`` of eval, which must exist: the current folder).
REQUIRED = {
    "eval": ["--data", "."],
    "probe": ["--train", "t", "--eval", "e"],
    "sweep": ["--data", ".", "--out", "o"],
    "tune-alpha": ["--data", ".", "--out", "o"],
    "tune-budget": ["--data", ".", "--out", "o"],
    "bench": [],
    "visualize": ["--out", "o"],
    "export": ["--onnx", "m.onnx"],
}
CRITERION, ALPHA, KEEP, BUDGET = "random,renyi", "1,inf", "0.5,0.7", "0.5,0.75"  # no command's defaults
#: The commands taking each shared comma list, and the value it must parse to.
SHARED = {
    "--criterion": (["eval", "probe", "sweep", "tune-alpha", "tune-budget", "bench"], CRITERION,
                    ["random", "renyi"]),
    "--alpha": (["eval", "probe", "sweep", "tune-alpha", "bench"], ALPHA, [1.0, math.inf]),
    "--keep": (["eval", "probe", "sweep", "tune-alpha", "bench"], KEEP, [0.5, 0.7]),
    "--budget": (["eval", "probe", "sweep", "tune-budget", "bench"], BUDGET, [0.5, 0.75]),
}  # fmt: skip
CASES = [(cmd, flag, text, want) for flag, (cmds, text, want) in SHARED.items() for cmd in cmds]
#: Old spellings that still parse: (command, old, new, value).
OLD_SPELLINGS = [
    ("sweep", "--criteria", "--criterion", CRITERION),
    ("sweep", "--alphas", "--alpha", ALPHA),
    ("sweep", "--budgets", "--budget", BUDGET),
    ("sweep", "--lambdas", "--lambda", "0.25,0.75"),
    ("tune-alpha", "--alphas", "--alpha", ALPHA),
    ("tune-alpha", "--lambdas", "--lambda", "0.25,0.75"),
    ("tune-budget", "--budgets", "--budget", BUDGET),
    ("tune-budget", "--candidates", "--criterion", "tome,evit[removed=merge]"),
    ("bench", "--criteria", "--criterion", CRITERION),
    ("visualize", "--criteria", "--criterion", CRITERION),
    ("visualize", "--alphas", "--alpha", ALPHA),
]
COMMANDS = list(REQUIRED)


def parse(cmd: str, *flags: str) -> argparse.Namespace:
    return build_parser().parse_args([cmd, *REQUIRED[cmd], *flags])


def help_text(cmd: str, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("cmd,flag,text,want", CASES, ids=[f"{c} {f}" for c, f, _, _ in CASES])
def test_shared_flag_parses_to_the_same_field_and_value(cmd, flag, text, want):
    args = vars(parse(cmd, flag, text))
    assert args[flag[2:]] == want
    assert args[flag[2:]] != vars(parse(cmd))[flag[2:]]  # the flag was read, not its default kept


@pytest.mark.parametrize("cmd", ["eval", "probe", "sweep", "bench"])
def test_all_four_together_mean_the_same_in_every_command(cmd):
    flags = ["--criterion", CRITERION, "--alpha", ALPHA, "--keep", KEEP, "--budget", BUDGET]
    args, ref = vars(parse(cmd, *flags)), vars(parse("eval", *flags))
    fields = ("criterion", "alpha", "keep", "budget")
    assert {k: args[k] for k in fields} == {k: ref[k] for k in fields}
    assert ref["budget"] == [0.5, 0.75] and ref["alpha"] == [1.0, math.inf]


def test_visualize_reads_the_same_criterion_and_alpha_lists(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    args = parse("visualize", "--criterion", CRITERION, "--alpha", ALPHA, str(image))
    opt = visualize_cmd.parse_options(args)
    assert opt.alphas == [1.0, math.inf]
    assert [s.criterion for s in opt.specs] == ["random", "renyi", "renyi"]  # renyi: one mask row per α
    with pytest.raises(ValueError, match="one keep rate"):  # it draws one keep rate (as export, train)
        visualize_cmd.parse_options(parse("visualize", "--keep", KEEP, str(image)))


def test_export_takes_one_value_of_each():
    args = parse("export", "--criterion", "renyi", "--alpha", "inf", "--keep", "0.5")
    assert (args.criterion, args.alpha, args.keep) == ("renyi", math.inf, 0.5)


@pytest.mark.parametrize("cmd,old,new,value", OLD_SPELLINGS, ids=[f"{c} {o}" for c, o, _, _ in OLD_SPELLINGS])
def test_old_spelling_parses_to_the_new_one(cmd, old, new, value):
    with_old, with_new = vars(parse(cmd, old, value)), vars(parse(cmd, new, value))
    assert with_old == with_new
    assert with_new != vars(parse(cmd))  # the value given changed something


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_shows_only_the_shared_names(cmd, capsys):
    text = help_text(cmd, capsys)
    words = set(text.replace(",", " ").replace("[", " ").replace("]", " ").split())
    assert not words & {"--criteria", "--alphas", "--budgets", "--candidates", "--lambdas"}
    taking = {flag for flag, (cmds, _, _) in SHARED.items() if cmd in cmds}
    assert taking <= words, taking - words
    if cmd in ("visualize", "export"):
        assert {"--criterion", "--alpha", "--keep"} <= words


def test_sweep_budget_numbers_are_gmacs_budgets(capsys):
    args = parse("sweep", "--budget", "0.5", "--criterion", "evit", "--keep", "0.7")
    assert args.budget == [0.5] and args.adaptive == []
    assert capsys.readouterr().err == ""
    (cfg,) = grid_points(grid_of(args), args.criterion, args.adaptive)
    assert cfg.budget == 0.5 and not cfg.adaptive  # keep rate solved for 0.5 GMACs


def test_sweep_adaptive_is_the_per_image_mode(capsys):
    args = parse("sweep", "--adaptive", "renyi", "--criterion", "evit", "--alpha", "2", "--keep", "0.7")
    assert args.adaptive == ["renyi"] and args.budget is None
    assert capsys.readouterr().err == ""
    evit, renyi = grid_points(grid_of(args), args.criterion, args.adaptive)
    assert (evit.plan.stages[0].criterion, evit.adaptive) == ("evit", False)
    stage = renyi.plan.stages[0]
    got = (stage.criterion, renyi.adaptive, stage.keep_rate, stage.options)
    assert got == ("renyi", True, 0.7, {"alpha": 2.0})


def test_sweep_budget_with_criterion_names_is_the_deprecated_adaptive_spelling(capsys):
    old = parse("sweep", "--budget", "renyi:2")
    err = capsys.readouterr().err
    assert vars(old) == vars(parse("sweep", "--adaptive", "renyi:2"))
    assert old.adaptive == ["renyi:2"] and old.budget is None
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "deprecated" in lines[0] and "--adaptive renyi:2" in lines[0], err
    both = parse("sweep", "--budget", "0.6", "--budget", "renyi")  # budgets and the adaptive mode together
    assert (both.budget, both.adaptive) == ([0.6], ["renyi"])


@pytest.mark.parametrize("value", ["0.5,renyi", "0", "1.5", "nan"])
def test_sweep_budget_rejects_mixed_or_out_of_range_values(value, capsys):
    with pytest.raises(SystemExit) as e:
        parse("sweep", "--budget", value)
    assert e.value.code == 2
    assert "argument --budget" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["sweep", "tune-alpha"])
def test_sweep_fuse_alone_means_on_as_elsewhere(cmd):
    assert parse(cmd, "--fuse").fuse == [True] == parse(cmd, "--fuse", "on").fuse
    assert parse(cmd, "--fuse", "off,on").fuse == [False, True]
    assert parse("eval", "--fuse").fuse is True and parse("eval").fuse is False


def test_probe_takes_evals_configuration_arguments_unchanged():
    flags = ["--criterion", "evit,tome", "--keep", "0.5", "--fuse", "--fusion", "renorm", "--tome-r", "4,8",
             "--removed", "fuse", "--locations", "2,5", "--seed", "3", "--direction", "column"]  # fmt: skip
    probe, ev = vars(parse("probe", *flags)), vars(parse("eval", *flags))
    bare = argparse.ArgumentParser()
    eval_cmd.add_config_args(bare)
    fields = set(vars(bare.parse_args([])))
    assert {"criterion", "alpha", "keep", "budget", "fusion", "tome_r", "policy", "cls_key", "seed"} <= fields
    assert {k: probe[k] for k in fields} == {k: ev[k] for k in fields}
    assert probe["fusion"] == "renorm" and probe["tome_r"] == [4, 8]
    assert probe["criterion"] == ["evit", "tome"]


def test_patch_takes_exactly_the_fields_of_patch_args():
    """``PatchArgs`` (what ``build_plan`` reads) lists patch's parameters after the model, once."""
    patch_params = inspect.signature(rp.patch).parameters
    assert list(patch_params) == ["model", *(f.name for f in fields(PatchArgs))]
    assert patch_params["model"].default is inspect.Parameter.empty  # required for patch
    assert all(patch_params[f.name].default == f.default for f in fields(PatchArgs) if f.name != "options")
    assert patch_params["budget"].kind is inspect.Parameter.KEYWORD_ONLY
    assert patch_params["options"].kind is inspect.Parameter.VAR_KEYWORD
    assert PatchArgs.bind(0.5, "evit", budget=None, lam=0.3) == PatchArgs(0.5, "evit", options={"lam": 0.3})
    assert isinstance(build_plan(PatchArgs(0.5, "evit")), rp.PrunePlan)
