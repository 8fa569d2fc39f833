"""Plans, prune/merge and the planners: validation before any model is touched, the same model as patch(),
and patch(method="tome") refusing the pruning arguments it used to ignore."""

import pytest
import torch

import renyiprune as rp
from renyiprune import MergePlan, PrunePlan
from renyiprune.core.api import apply
from renyiprune.core.plans import Stage
from renyiprune.core.state import is_patched
from renyiprune.models.model import VisionTransformer
from renyiprune.planning import policy
from renyiprune.planning.flops import count_gmacs


def tiny(depth: int = 6) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2).eval()


@pytest.mark.parametrize(
    ("build", "needle"),
    [
        (lambda: Stage(3, keep_rate=0.0), "keep rate must be in"),
        (lambda: Stage(3), "either keep_rate or tokens"),
        (lambda: Stage(3, keep_rate=0.5, tokens=4), "either keep_rate or tokens"),
        (lambda: Stage(3, tokens=0), "tokens must be >= 1"),
        (lambda: Stage(-1, keep_rate=0.5), "block index >= 0"),
        (lambda: Stage(3, keep_rate=0.5, criterion="nope"), "unknown criterion 'nope'"),
        (lambda: Stage(3, keep_rate=0.5, criterion="evit", options={"alpha": 2}), "has no option alpha"),
        (lambda: PrunePlan.uniform(0.5, locations=(6, 3)), "increasing and distinct"),
        (lambda: PrunePlan.uniform(0.5, removed="keep"), "removed must be"),
        (lambda: PrunePlan.uniform(0.5, fusion="renorm"), "applies to fused pruning only"),
        (lambda: PrunePlan.uniform([0.5, 0.6], locations=(1, 2, 3)), "2 values for 3 pruning locations"),
        (lambda: MergePlan(r=-1), "r must be >= 0"),
        (lambda: MergePlan(schedule="sometimes"), "schedule must be"),
        (lambda: MergePlan(merge_order="nope"), "nope"),
    ],
)
def test_plans_refuse_bad_values_when_built(build, needle):
    with pytest.raises(ValueError, match=needle):
        build()


def test_prune_and_merge_check_the_plan_against_the_model():
    m = tiny(depth=6)
    with pytest.raises(ValueError, match="out of range for a model with 6 blocks"):
        rp.prune(m, PrunePlan.uniform(0.5, locations=(2, 6)))
    assert not is_patched(m)
    with pytest.raises(TypeError, match="prune takes a PrunePlan"):
        rp.prune(m, MergePlan(r=2))
    with pytest.raises(TypeError, match="merge takes a MergePlan"):
        rp.merge(m, PrunePlan.uniform(0.5))


@pytest.mark.parametrize(
    ("kwargs", "plan"),
    [
        (dict(keep_rate=0.5, alpha=2.0, locations=(1, 3)),
         PrunePlan.uniform(0.5, "renyi", (1, 3), alpha=2.0)),
        (dict(keep_rate=[0.7, 0.5], criterion=["evit", "renyi"], alpha=[1.0, 3.0], locations=(1, 3),
              fuse=True),
         PrunePlan((Stage(1, 0.7, criterion="evit"),
                    Stage(3, 0.5, criterion="renyi", options={"alpha": 3.0})), removed="fuse")),
        (dict(tokens=5, criterion="evit", locations=(2,), removed="merge"),
         PrunePlan((Stage(2, tokens=5, criterion="evit"),), removed="merge")),
        (dict(method="tome", r=3, schedule="decreasing"), MergePlan(r=3, schedule="decreasing")),
    ],
)
def test_patch_is_the_plan_it_builds(kwargs, plan):
    """patch(**kwargs) and prune/merge(plan) give the same state and bit-identical outputs."""
    x = torch.randn(3, 3, 32, 32)
    a, b = tiny(), tiny()
    rp.patch(a, **kwargs)
    apply(b, plan)
    assert a.renyiprune.describe() == b.renyiprune.describe()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize(
    "pruning_only",
    [dict(keep_rate=0.5), dict(locations=(1, 2)), dict(tokens=4), dict(fuse=True), dict(removed="merge"),
     dict(criterion="evit"), dict(fusion="renorm")],
)
def test_tome_refuses_pruning_arguments_instead_of_ignoring_them(pruning_only):
    m = tiny()
    with pytest.raises(ValueError, match="method='tome' merges r tokens after every block"):
        rp.patch(m, method="tome", r=2, **pruning_only)
    assert not is_patched(m)


def test_plan_for_budget_does_not_touch_the_model_and_meets_the_budget():
    m = tiny()
    full = count_gmacs(m)
    plan = rp.plan_for_budget(m, "prune", 0.7, criterion="shannon", locations=(1, 3))
    assert not is_patched(m)
    assert count_gmacs(rp.prune(m, plan)) <= 0.7 * full * (1 + 1e-9)
    # the largest such rate: one more first-location patch would exceed the budget
    step = 1.0 / m.patch_embed.num_patches
    looser = plan.with_keep_rate(plan.stages[0].keep_rate + step)
    assert count_gmacs(rp.prune(m, looser)) > 0.7 * full
    tome = rp.plan_for_budget(rp.unpatch(m), "tome", 0.7)
    assert isinstance(tome, MergePlan) and count_gmacs(rp.merge(m, tome)) <= 0.7 * full * (1 + 1e-9)


@pytest.mark.parametrize("patched", ["merged", "pruned"])
def test_plan_for_budget_on_a_patched_model_plans_for_the_unpatched_one(patched):
    """README: merge(model, ...) then plan_for_budget(model, ...) used to raise "share_parameters expects
    an unpatched model"; now the plan is the unpatched model's, and the model keeps its own patching."""
    m = tiny()
    want = rp.plan_for_budget(m, "prune", 0.6, criterion="evit", locations=(1, 3))
    if patched == "merged":
        rp.merge(m, MergePlan(r=2))
    else:
        rp.prune(m, PrunePlan.uniform(0.5, "renyi", locations=(2,)))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before, y = m.renyiprune.describe(), m(x)
        assert rp.plan_for_budget(m, "prune", 0.6, criterion="evit", locations=(1, 3)) == want
        assert m.renyiprune.describe() == before and torch.equal(m(x), y)
    assert rp.plan_for_budget(m, "tome", 0.6) == rp.plan_for_budget(rp.unpatch(m), "tome", 0.6)


def test_policy_best_returns_the_shipped_choice_as_a_plan():
    entry = policy.policy_entry(policy.load_policy(), 0.7)
    plan = policy.best("deit_tiny_patch16_224", keep_rate=0.7)
    assert isinstance(plan, PrunePlan)
    assert plan.stages[0].criterion == entry["criterion"].split("@")[0].split(":")[0]
    with pytest.raises(ValueError, match="either keep_rate or budget"):
        policy.best("deit_tiny_patch16_224")
