"""The accuracy-against-speed frontier (benchmarks/frontier.py) chooses with the calibration half and
reports the evaluation half, and docs/performance.md shows what the script computes from the recorded
results (benchmarks/results/frontier.json, docs/results.md §4, the shipped policy)."""

import json
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import frontier  # noqa: E402


def _point(method: str, budget: float, cal: float, ev: float, speed: float) -> dict:
    family = "ToMe" if method == frontier.TOME else "pruning + merge"
    return dict(method=method, family=family, budget=budget, calibration_top1=cal, evaluation_top1=ev,
                images_per_s=speed)  # fmt: skip


def _halves_disagree() -> list[dict]:
    # "fast" is the fastest and the best on the evaluation half, but poor on the calibration half;
    # "steady" is good on calibration and poor on evaluation: the choice must follow calibration.
    return [
        _point(frontier.TOME, 0.9, 79.0, 79.0, 10.0),
        _point(frontier.TOME, 0.5, 75.0, 75.0, 20.0),
        _point("steady", 0.5, 78.0, 60.0, 25.0),
        _point("fast", 0.5, 60.0, 78.0, 30.0),
    ]


def test_choice_follows_the_calibration_half_and_reports_the_evaluation_half():
    pairs = {("steady", 0.5): {"delta": -15.0, "ci95": [-20.0, -10.0]}}
    rows = {r["level"]: r for r in frontier.frontier_rows(_halves_disagree(), pairs)}
    assert sorted(rows) == [75.0, 75.5, 76.0, 76.5, 77.0, 77.5, 78.0, 78.5, 79.0]
    assert rows[79.0]["best"]["method"] == frontier.TOME and rows[79.0]["vs_tome"] == dict(delta=0.0,
                                                                                           ci95=(0.0, 0.0))
    for level in (78.0, 75.0):
        row = rows[level]
        assert row["best"]["method"] == "steady"  # not "fast", which leads the evaluation half
        assert row["best"]["evaluation_top1"] == 60.0
        assert row["equal"]["budget"] == 0.5 and row["vs_equal"] == dict(delta=-15.0, ci95=(-20.0, -10.0))
    # the fastest plain ToMe reaching 78 on calibration is at 0.9: no recorded pair, no interval
    assert rows[78.0]["tome"]["budget"] == 0.9 and rows[78.0]["vs_tome"] == dict(delta=-19.0, ci95=None)
    assert rows[75.0]["tome"]["budget"] == 0.5 and rows[75.0]["vs_tome"]["ci95"] == (-20.0, -10.0)


def test_evaluation_numbers_never_change_the_choice():
    points = _halves_disagree()
    chosen = [(r["best"]["method"], r["best"]["budget"]) for r in frontier.frontier_rows(points)]
    rng = random.Random(0)
    for _ in range(5):
        shuffled = [dict(p, evaluation_top1=rng.uniform(0, 100)) for p in points]
        again = [(r["best"]["method"], r["best"]["budget"]) for r in frontier.frontier_rows(shuffled)]
        assert again == chosen


def test_recorded_pairs_are_the_policy_choices_against_tome_at_the_same_budget():
    shipped = frontier.shipped_top1()
    pairs = frontier.recorded_pairs()
    policy = json.loads(frontier.POLICY.read_text())
    assert len(pairs) == len(policy["budget"])  # every choice maps onto a frontier method
    for (label, f), pair in pairs.items():
        assert pair["delta"] == pytest.approx(shipped[label][f][0] - shipped[frontier.TOME][f][0], abs=0.01)
        assert pair["ci95"][0] <= pair["delta"] <= pair["ci95"][1]


def test_documented_frontier_is_what_the_script_computes_from_the_recorded_results():
    res = json.loads((REPO / "benchmarks" / "results" / "frontier.json").read_text())
    shipped, calibration = frontier.shipped_top1(), frontier.calibration_top1()
    for p in res["points"]:  # the recorded evaluation top-1 is results §4's
        assert p["top1"] == shipped[p["method"]][p["budget"] or frontier.BUDGETS[0]][0]
        if p["budget"] is not None:
            assert p["method"] in calibration
    doc = (REPO / "docs" / "performance.md").read_text()
    start, end = "<!-- frontier:start -->", "<!-- frontier:end -->"
    block = doc[doc.index(start) + len(start) : doc.index(end)]
    assert block.strip() == frontier.render(res).strip()
    assert "never the fastest method at any top-1 level" not in doc
