"""``patch(model, ...)``: the keyword-argument convenience over plans, planners and ``prune``/``merge``.

``patch`` builds a plan from its arguments (``planning.build_plan``; ``criterion="best"`` through the
shipped policy, ``budget=F`` through the budget planner) and applies it with ``core.apply``. Everything
it does can be written with the plan API directly::

    prune(model, PrunePlan.uniform(0.7, "renyi", (3, 6, 9), alpha=2.0))   # patch(model, 0.7, alpha=2)
    merge(model, MergePlan(r=8))                                          # patch(model, method="tome", r=8)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .core.api import apply, unpatch
from .core.hosts import UnsupportedModelError, find_host, model_name
from .planning import policy
from .planning.budget import plan_for_budget
from .planning.build import DEFAULT_KEEP_RATE, PATCH_SIGNATURE, PatchArgs, build_plan

__all__ = ["patch"]


def patch(model: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """Make ``model`` reduce its tokens in place and return it.

    ``method="prune"`` (EViT-style): at each block in ``locations`` (0-based, default (3, 6, 9)), after
    the attention residual and before the MLP, ceil(keep_rate * n) of the n current patch tokens with the
    highest criterion score are kept (CLS always); ``keep_rate`` defaults to 0.7, ``criterion`` to
    ``"renyi"``. ``keep_rate``, ``criterion`` and ``alpha`` may be one value or one per location;
    ``alpha`` goes to criteria that take it, other options to the criterion.
    ``removed`` decides the fate of pruned tokens: ``drop`` (default), ``fuse`` (one extra token
    weighted by CLS attention; ``fuse=True`` is the same) or ``merge`` (into the most similar kept
    token, with proportional attention afterwards). ``fusion`` picks the fusion rule: ``"evit"``
    (default; EViT's official code: raw CLS-attention weights, and the fused token is ranked, counted
    and possibly fused again at later locations like any patch) or ``"renorm"`` (weights renormalized
    over the fused tokens, the fused token never ranked and always carried).
    ``method="tome"``: ToMe's bipartite soft matching merges ``r`` tokens after every block (an int,
    one int per block, or ``schedule="decreasing"``: 2r at the first block down to 0 at the last);
    ``entropy_weight``/``merge_order``/``alpha`` set its merge order. The pruning arguments
    (``keep_rate``, ``criterion``, ``locations``, ``tokens``, ``fuse``, ``removed``, ``fusion``) do not apply
    to it and raise a ValueError.
    ``tokens``: patches kept at each location (one int or one per location) instead of a keep rate.
    ``budget=F`` solves the keep rate (prune) or r (tome) for the largest GMACs <= F x unpruned
    (``planning.budget.plan_for_budget``); with ``criterion="best"`` the shipped policy's choice
    (``planning.policy.best``) is used: per keep rate, or per budget the policy's method.
    Patching a patched model reconfigures it.
    """
    a = PatchArgs.bind(*args, **kwargs)
    if a.budget is not None and find_host(model) is not None:
        raise UnsupportedModelError(
            f"budget= is not supported for {type(model).__name__}; pass keep_rate (or r for ToMe)"
        )
    if a.budget is not None:
        unpatch(model)  # the budget is solved on a parameter-sharing copy of the unpatched model
    if a.criterion == "best" and a.method == "prune":
        keep = None if a.budget is not None else DEFAULT_KEEP_RATE if a.keep_rate is None else a.keep_rate
        plan = policy.best(model_name(model), keep, a.budget, model=model, args=a)
    else:
        plan = build_plan(a)
        if a.budget is not None:
            plan = plan_for_budget(model, plan, a.budget)
    return apply(model, plan)


patch.__signature__ = PATCH_SIGNATURE  # help(), IDEs: the parameters are PatchArgs' fields, listed there
