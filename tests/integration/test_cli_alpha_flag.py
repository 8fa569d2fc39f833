"""``--alpha`` reaches every criterion that takes a Rényi order (``criteria.takes_alpha``), and no other.

For every registered criterion: the configurations ``eval`` builds from ``--alpha 2`` and ``--alpha 1``
carry that order exactly when ``takes_alpha`` says so (label and config), and the scores of a real
forward change with it exactly there, and are bit-identical elsewhere. The sweep's spec parser and the
benchmark's rows follow the same rule.
"""

import pytest
import torch
from plan_points import point

from renyiprune.core.criteria import list_criteria, takes_alpha
from renyiprune.experiments.evaluate import pruned_view
from renyiprune.models.model import VisionTransformer
from renyiprune.planning.points import Point

ALL = list_criteria()


def _configs(tmp_path, criterion, alpha, *extra):
    from renyiprune.cli import build_parser
    from renyiprune.cli import eval as eval_cmd

    argv = ["eval", "--data", str(tmp_path), "--criterion", criterion, "--alpha", alpha, "--keep", "0.5",
            "--locations", "1,2", *extra]  # fmt: skip
    return eval_cmd.configs_from_args(build_parser().parse_args(argv))


@pytest.fixture(scope="module")
def model_and_images():
    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=5).eval()
    return m, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _scores(model, images, config: Point) -> list[torch.Tensor]:
    view = pruned_view(model, config)
    with torch.no_grad():
        view(images)
    return [r.scores for r in view.renyiprune.records]


def test_the_registry_has_criteria_of_both_kinds():
    """The test below means something only if some criteria take α and some do not."""
    assert {"renyi", "hybrid", "evit_renyi"} <= {c for c in ALL if takes_alpha(c)}
    assert {"evit", "shannon", "random"} <= {c for c in ALL if not takes_alpha(c)}


@pytest.mark.parametrize("criterion", ALL)
@pytest.mark.parametrize("extra", [(), ("--fuse",), ("--tokens", "8,4")])
def test_eval_alpha_reaches_exactly_the_criteria_that_take_it(tmp_path, model_and_images, criterion, extra):
    (two,), (one,) = _configs(tmp_path, criterion, "2", *extra), _configs(tmp_path, criterion, "1", *extra)
    d2, d1 = two.to_dict(), one.to_dict()
    takes = takes_alpha(criterion, {k: v for k, v in d2["options"].items() if k != "tokens"})
    assert d2["alpha"] == (2.0 if takes else 1.0) and d1["alpha"] == 1.0
    assert all(s.options.get("alpha", 2.0) == 2.0 for s in two.plan.stages)
    assert (two.label != one.label) == takes
    if takes:
        assert " a=2 " in two.label and " a=1 " in one.label
    model, images = model_and_images
    s2, s1 = _scores(model, images, two), _scores(model, images, one)
    assert len(s2) == len(s1) == 2
    if takes:
        assert not torch.equal(s2[0], s1[0])
    else:
        assert all(torch.equal(a, b) for a, b in zip(s2, s1, strict=True))


def test_evit_renyi_runs_the_order_asked_for(tmp_path, model_and_images):
    """The report that started this: ``eval --criterion evit_renyi --alpha 2`` ran α = 1."""
    from renyiprune.core.attention import Site
    from renyiprune.core.criteria import make_criterion
    from renyiprune.core.streamed import score_block

    (cfg,) = _configs(tmp_path, "evit_renyi", "2")
    model, images = model_and_images
    view = pruned_view(model, cfg)
    view.renyiprune.attention = "explicit"  # the path score_block below recomputes, bit for bit
    assert [s.name for s in view.renyiprune.stages] == ["evit_renyi(a=2)"] * 2
    with torch.no_grad():
        view(images)
        # the first stage's scores, recomputed at α = 2 and at α = 1 from the same block input
        x = model.patch_embed(images)
        x = torch.cat([model.cls_token.expand(2, -1, -1), x], dim=1) + model.pos_embed
        x = model.blocks[0](x)
        blk = model.blocks[1]
        site = Site(num_patches=16, explicit=True)
        at2 = score_block(blk.attn, blk.norm1(x), make_criterion("evit_renyi", alpha=2.0), site)[1]
        at1 = score_block(blk.attn, blk.norm1(x), make_criterion("evit_renyi", alpha=1.0), site)[1]
    assert torch.equal(view.renyiprune.records[0].scores, at2) and not torch.equal(at2, at1)


@pytest.mark.parametrize("criterion", ALL)
def test_sweep_specs_cross_alphas_exactly_where_the_criterion_takes_it(criterion):
    from renyiprune.experiments.grid import parse_spec

    _, alphas, _ = parse_spec(criterion, [1.0, 2.0])
    assert alphas == ([1.0, 2.0] if takes_alpha(criterion) else [1.0])


def test_hybrid_over_another_base_takes_no_alpha():
    from renyiprune.experiments.grid import parse_spec

    assert parse_spec("hybrid[base=headvar]", [1.0, 2.0])[1] == [1.0]
    config = point("hybrid", 0.5, 2.0, options={"base": "headvar"})
    assert config.label == "hybrid base=headvar r=0.5"


def test_benchmark_rows_report_alpha_for_every_criterion_that_takes_it(model_and_images):
    from renyiprune.experiments.benchmark import BenchSettings, benchmark_configs

    model, images = model_and_images
    configs = [point(c, 0.5, 2.0, (1, 2)) for c in ("renyi", "evit_renyi", "hybrid", "evit")]
    quick = BenchSettings(warmup=0, reps=1)
    rows = {r.criterion: r for r in benchmark_configs(model, configs, images, quick)}
    assert rows["renyi"].alpha == rows["evit_renyi"].alpha == rows["hybrid"].alpha == 2.0
    assert rows["evit"].alpha is None and rows[None].alpha is None
