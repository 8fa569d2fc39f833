"""Apply a plan to a model in place: ``prune(model, PrunePlan)``, ``merge(model, MergePlan)``, ``unpatch``.

The model's class and the classes of the blocks the plan touches are swapped for subclasses with the
mixins of ``core.blocks``; the configuration lives in one ``PruneState`` at ``model.renyiprune``. Applying a
plan to a patched model reconfigures it. Models of a registered host (``core.hosts``: Hugging Face,
timm) are adapted first; nothing else is needed from the caller.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

from torch import nn

from .blocks import MergingBlock, PrunedModel, PruningBlock, SizedBlock, subclass
from .criteria import make_criterion
from .hosts import check_model, find_host
from .plans import MergePlan, PrunePlan
from .state import PruneState, StageConfig, is_patched, unpatch

__all__ = ["prune", "merge", "apply", "unpatch", "is_patched", "share_parameters", "unpatched_copy"]


def prune(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Make ``model`` prune tokens as ``plan`` says, in place, and return it.

    At each stage's block (0-based), after the attention residual and before the MLP, the patches with the
    highest criterion scores are kept (prefix tokens always); the others are dropped, fused or merged.
    """
    if not isinstance(plan, PrunePlan):
        raise TypeError(f"prune takes a PrunePlan, got {type(plan).__name__} (merge takes a MergePlan)")
    return _configure(model, lambda blocks: _pruning_state(blocks, plan))


def merge(model: nn.Module, plan: MergePlan) -> nn.Module:
    """Make ``model`` merge tokens by ToMe's bipartite soft matching after every block, in place."""
    if not isinstance(plan, MergePlan):
        raise TypeError(f"merge takes a MergePlan, got {type(plan).__name__} (prune takes a PrunePlan)")
    return _configure(model, lambda blocks: _merging_state(blocks, plan))


def apply(model: nn.Module, plan: PrunePlan | MergePlan) -> nn.Module:
    """``prune`` or ``merge``, whichever the plan is for."""
    return merge(model, plan) if isinstance(plan, MergePlan) else prune(model, plan)


def share_parameters(model: nn.Module) -> nn.Module:
    """A copy of the module tree whose modules share ``model``'s parameters and buffers.

    Patching the copy swaps only the copy's classes, so several pruning configurations of one
    model can live side by side without duplicating weights.
    """
    if is_patched(model):
        raise ValueError("share_parameters expects an unpatched model")
    return _shared_copy(model, {})


def unpatched_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` as ``unpatch`` would leave it, sharing its parameters and buffers; ``model``
    keeps its pruning or merging. For an unpatched model, the same as ``share_parameters``."""
    classes = model.renyiprune.original_classes if is_patched(model) else {}
    return _shared_copy(model, classes)


def _shared_copy(module: nn.Module, classes: dict[int, type]) -> nn.Module:
    """``module``'s tree copied module by module (new ``__dict__``s; the ``_parameters``/``_buffers`` dicts
    stay shared), each module's class replaced by ``classes[id(module)]`` where given and the pruning
    state left out, as ``unpatch`` does in place."""
    clone = copy.copy(module)
    cls = classes.get(id(module))
    if cls is not None:
        clone.__class__ = cls
    for attr in ("renyiprune", "_renyiprune", "_renyiprune_stage", "_renyiprune_block"):
        clone.__dict__.pop(attr, None)
    clone._modules = {name: _shared_copy(child, classes) for name, child in module._modules.items()}
    return clone


Install = Callable[[Sequence[nn.Module]], PruneState]


def _configure(model: nn.Module, install: Install) -> nn.Module:
    """Swap the classes ``install`` chooses for ``model``'s blocks (adapting a host model's layers first),
    then give the model the state and its mixin."""
    host = find_host(model)
    if host is None:
        blocks = check_model(model)
        unpatch(model)
        state = install(blocks)
        state.num_prefix = int(getattr(model, "num_prefix_tokens", 1))
        _attach(model, state, PrunedModel)
        return model
    unpatch(model)
    adapted = host.adapt(model)
    originals = adapted.originals
    modules = [m for m in model.modules() if id(m) in originals]
    try:
        state = install(adapted.view.blocks)
    except BaseException:
        for m in modules:
            m.__class__ = originals[id(m)]
        raise
    state.num_prefix = adapted.view.num_prefix_tokens
    for m in modules:
        if "_renyiprune" in m.__dict__:  # a pruning location: unpatch restores the host's class
            state.original_classes[id(m)] = originals[id(m)]
        else:  # adapted only for the check: back to the host's class now
            m.__class__ = originals[id(m)]
            state.original_classes.pop(id(m), None)
    _attach(model, state, adapted.model_mixin or PrunedModel)
    return model


def _attach(model: nn.Module, state: PruneState, mixin: type) -> None:
    state.original_classes[id(model)] = model.__class__
    model.__class__ = subclass(mixin, model.__class__)
    model.renyiprune = state


def _swap(block: nn.Module, mixin: type, state: PruneState) -> None:
    state.original_classes[id(block)] = block.__class__
    block.__class__ = subclass(mixin, block.__class__)
    block._renyiprune = state


def _pruning_state(blocks: Sequence[nn.Module], plan: PrunePlan) -> PruneState:
    locs = list(plan.locations)
    if any(i >= len(blocks) for i in locs):
        raise ValueError(f"locations {locs} out of range for a model with {len(blocks)} blocks (0-based)")
    stages = [
        StageConfig(s.location, s.keep_rate, make_criterion(s.criterion, **s.options), s.name, s.tokens)
        for s in plan.stages
    ]
    state = PruneState(stages=stages, removed=plan.removed, fusion=plan.fusion or "evit")
    for si, loc in enumerate(locs):
        _swap(blocks[loc], PruningBlock, state)
        blocks[loc]._renyiprune_stage = si
    if plan.removed == "merge" and locs:  # proportional attention in every block after the first merge
        for b in blocks[locs[0] + 1 :]:
            if not hasattr(b, "_renyiprune"):
                _swap(b, SizedBlock, state)
    return state


def _merging_state(blocks: Sequence[nn.Module], plan: MergePlan) -> PruneState:
    state = PruneState(
        stages=[], removed="merge", method="tome", merge_r=plan.per_block(len(blocks)),
        entropy_weight=plan.entropy_weight, entropy_alpha=plan.alpha, merge_order=plan.merge_order,
    )  # fmt: skip
    for i, b in enumerate(blocks):
        _swap(b, MergingBlock, state)
        b._renyiprune_block = i
    return state
