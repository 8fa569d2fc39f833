"""Paired top-1 comparison: against scipy's binomial test and a brute-force interval."""

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import binomtest, norm

from renyiprune.experiments.stats import paired_counts, paired_difference


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=300))
def test_paired_difference_matches_scipy_and_naive_formulas(pairs):
    a = "".join("1" if x else "0" for x, _ in pairs)
    b = "".join("1" if y else "0" for _, y in pairs)
    r = paired_difference(a, b)
    n = len(pairs)
    assert r["delta"] == pytest.approx(100 * (a.count("1") - b.count("1")) / n)
    d = [int(x) - int(y) for x, y in zip(a, b, strict=True)]
    mean = sum(d) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / n)
    lo, hi = r["ci95"]
    assert lo == pytest.approx(100 * (mean - norm.ppf(0.975) * sd / math.sqrt(n)), abs=1e-6)
    assert hi == pytest.approx(100 * (mean + norm.ppf(0.975) * sd / math.sqrt(n)), abs=1e-6)
    k = r["a_only"] + r["b_only"]
    ref = 1.0 if k == 0 else binomtest(r["a_only"], k, 0.5).pvalue
    assert r["p_mcnemar"] == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_a_clear_gain_is_significant_and_a_coin_flip_is_not():
    rng = random.Random(0)
    base = "".join(rng.choice("01") for _ in range(500))
    better = "1" * 40 + base[40:]  # 40 images fixed, none broken
    r = paired_difference(better, base)
    assert r["b_only"] == 0 and r["p_mcnemar"] < 1e-3 and r["ci95"][0] > 0
    same = paired_difference(base, base)
    assert same["delta"] == 0 and same["p_mcnemar"] == 1.0 and same["ci95"] == (0.0, 0.0)


def test_mismatched_or_bad_outcomes_are_refused():
    with pytest.raises(ValueError, match="same images"):
        paired_difference("101", "10")
    with pytest.raises(ValueError, match="'0' and '1'"):
        paired_difference("1x1", "101")
    with pytest.raises(ValueError, match="no images"):
        paired_difference("", "")


def test_counts_form_equals_the_outcome_form_and_checks_its_input():
    a, b = "1101001110", "1001101011"
    r = paired_difference(a, b)
    assert paired_counts(r["a_only"], r["b_only"], len(a)) == r
    with pytest.raises(ValueError, match="do not fit"):
        paired_counts(6, 5, 10)
    with pytest.raises(ValueError, match="no images"):
        paired_counts(0, 0, 0)


def test_evaluate_pairs_every_config_with_the_reference_image_by_image():
    import torch

    from renyiprune.data.images import Batch
    from renyiprune.experiments.evaluate import evaluate, pruned_view
    from renyiprune.models.model import VisionTransformer
    from renyiprune.planning.points import Point

    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, embed_dim=24, depth=4, num_heads=3, num_classes=3)
    m = VisionTransformer(**cfg).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, 32, 32, generator=g), torch.randint(0, 3, (40,), generator=g)
    batches = [Batch(x[i : i + 8], y[i : i + 8], torch.arange(i, i + 8), []) for i in range(0, 40, 8)]
    views = {"unpruned": m, "r=0.3": pruned_view(m, Point.from_spec("random", 0.3, 1.0, (1, 2), True))}
    res = {r.config: r for r in evaluate(views, batches, progress=False, reference="unpruned")}
    with torch.no_grad():
        hits = {k: (v(x).argmax(1) == y).tolist() for k, v in views.items()}
    right = {k: "".join("1" if c else "0" for c in h) for k, h in hits.items()}
    assert res["r=0.3"].paired == paired_difference(right["r=0.3"], right["unpruned"])
    assert res["unpruned"].paired["delta"] == 0 and res["unpruned"].paired["p_mcnemar"] == 1.0
    with pytest.raises(ValueError, match="reference"):
        evaluate(views, batches, progress=False, reference="nope")


def test_outcome_helpers_select_count_and_pair():
    from renyiprune.experiments.stats import paired_summary, select_outcomes, top1_of_outcomes

    a, b = "1101001", "1001011"
    mask = [True, False, True, True, False, False, True]
    assert select_outcomes(a, mask) == "1011" and select_outcomes(b, mask) == "1011"
    assert top1_of_outcomes(a) == pytest.approx(100 * 4 / 7) and top1_of_outcomes("") == 0.0
    s = paired_summary(a, b)  # A alone right on image 1, B alone right on image 5: a tie
    assert s["delta"] == 0.0 and s["p_mcnemar"] == 1.0 and s["ci95"][0] < 0 < s["ci95"][1]
    with pytest.raises(ValueError):
        select_outcomes(a, mask[:-1])
