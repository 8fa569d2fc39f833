"""The pruning state a patched model carries at ``model.renyiprune``, and how to take it off again.

``prune``/``merge`` (``core.api``) swap the classes of the model and of some of its blocks for subclasses
(the mixins in ``core.blocks``); everything those classes need, the configuration and the records of the
last forward, lives in one ``PruneState`` shared by them. ``unpatch`` restores the original classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .criteria import Criterion
from .selection import keep_count
from .streamed import tracing_or_exporting

__all__ = ["StageConfig", "StageRecord", "PruneState", "is_patched", "records", "unpatch"]


@dataclass
class StageConfig:
    """How one pruning location prunes: a keep rate, or a fixed number of patches (``tokens``)."""

    location: int
    keep_rate: float | None
    criterion: Criterion
    name: str
    tokens: int | None = None  # patches kept, instead of a rate

    def keep(self, n: int) -> int:
        """Patches kept out of ``n``."""
        return min(n, self.tokens) if self.tokens is not None else keep_count(n, self.keep_rate)


@dataclass
class StageRecord:
    """What one pruning location did in the last forward.

    ``kept`` (B, k) indices into that stage's n candidate tokens, ``patch_index`` (B, k) the original patch
    numbers (0..num_patches-1, row-major on the grid) of the survivors (-1: an EViT fused token), and
    ``scores`` (B, n); ``num_fused``: fused tokens appended after the kept ones.
    """

    location: int
    kept: Tensor
    patch_index: Tensor
    scores: Tensor
    num_fused: int


def forward_counter() -> Tensor:
    """A patched model's forward counter (``PruneState.step``): a 0-d int64 tensor, not an int, because
    torch.compile takes a module's int attributes for constants and so recompiled a patched model at every
    forward; an in-place add is part of the graph. Made outside inference mode so that it stays writable."""
    with torch.inference_mode(False):
        return torch.zeros((), dtype=torch.int64)


@dataclass
class PruneState:
    """Configuration and per-forward bookkeeping, shared by the patched model and its blocks.

    ``removed`` says what happens to pruned tokens: ``drop``, ``fuse`` (EViT's one extra token, built
    by the rule ``fusion``: ``evit`` or ``renorm``, see ``selection``) or ``merge`` (each into its most
    similar kept token). ``method="tome"`` merges ``merge_r[i]`` tokens
    after block i by bipartite soft matching instead of scoring. Merging tracks token sizes and uses
    proportional attention (log size added to the key logits) in every later block.
    """

    stages: list[StageConfig]
    original_classes: dict[int, type] = field(default_factory=dict)
    removed: str = "drop"
    method: str = "prune"
    merge_r: list[int] = field(default_factory=list)
    entropy_weight: float = 0.0  # ToMe: weight of the merge-order term (``merge_order.MERGE_ORDERS``)
    entropy_alpha: float = 1.0
    merge_order: str = "entropy"
    num_prefix: int = 1  # tokens before the patches (CLS, distillation, ...): always kept, never merged
    fusion: str = "evit"  # with removed="fuse": EViT's raw-weight, ranked fused token, or "renorm"
    # "streamed": pruning blocks compute only what the criterion needs (streamed.attend), never the
    # (B, H, N, N) matrix; "explicit": the full attention matrix, as before (kept for comparison).
    attention: str = "streamed"
    chunk_bytes: int | None = None  # memory budget of the streamed chunks (None: streamed's default)
    # Under autocast, "native" projects a pruning block's q, k, v in the autocast dtype like every other
    # block (its ranking logits are float32 all the same); "float32" projects them, and runs the block's
    # attention, in float32: closer to float32 rankings, slower (docs/precision.md).
    ranking_projection: str = "native"
    # Filled during a forward:
    step: Tensor = field(default_factory=forward_counter)  # forwards run so far
    records: list[StageRecord] = field(default_factory=list)
    patch_index: Tensor | None = None  # (B, n) original patch of each candidate token, -1: fused token
    size: Tensor | None = None  # (B, N, 1) patches per token, once tokens have been merged
    _grid: tuple = field(default=(), repr=False)  # (batch, patches, device) of the current forward

    @property
    def locations(self) -> tuple[int, ...]:
        """Blocks that change the token set."""
        if self.method == "tome":
            return tuple(i for i, r in enumerate(self.merge_r) if r > 0)
        return tuple(s.location for s in self.stages)

    def begin(self, batch: int, num_patches: int, device: torch.device) -> None:
        """Reset the per-forward records for a batch of ``batch`` images of ``num_patches`` patches."""
        self.records = []
        self.size = None
        self.patch_index = None  # made by the first pruning block (``candidates``): nothing held before it
        self._grid = (batch, num_patches, device)

    def end(self) -> None:
        """Count the forward that just ran (``step``); not while tracing or exporting, whose graphs hold no
        counter (torch.export refuses a graph that mutates a constant)."""
        if not tracing_or_exporting():
            self.step += 1

    def candidates(self) -> Tensor:
        """``patch_index`` (B, n) of the current candidate tokens; all patches at the first pruning block."""
        if self.patch_index is None:
            batch, num_patches, device = self._grid
            self.patch_index = torch.arange(num_patches, device=device).expand(batch, -1)
        return self.patch_index

    def key_bias(self) -> Tensor | None:
        """Proportional attention: log(size) of every key, (B, 1, 1, N), or None before any merge."""
        return None if self.size is None else self.size.log().transpose(1, 2).unsqueeze(1)

    def sizes(self, x: Tensor) -> Tensor:
        """Patches per token (B, N, 1) of the tokens ``x``: ones before any merge."""
        return self.size if self.size is not None else x.new_ones(x.shape[0], x.shape[1], 1)

    def describe(self) -> str:
        """One line: the method, each location's criterion and keep rate (or count), removed tokens' fate."""
        if self.method == "tome":
            ent = f" entropy_weight={self.entropy_weight:g}" if self.entropy_weight else ""
            if self.entropy_weight and self.merge_order != "entropy":
                ent += f" merge_order={self.merge_order}"
            return f"tome r={self.merge_r}{ent}"
        parts = [f"{s.name}@{s.location}:{s.tokens if s.tokens is not None else f'{s.keep_rate:g}'}"
                 for s in self.stages]
        fate = "" if self.removed == "drop" else f" +{self.removed}"
        if self.removed == "fuse" and self.fusion != "evit":
            fate += f" ({self.fusion})"
        return " ".join(parts) + fate


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` carries a pruning state (``prune``, ``merge`` or ``patch`` was applied)."""
    return isinstance(getattr(model, "renyiprune", None), PruneState)


def unpatch(model: nn.Module) -> nn.Module:
    """Restore a patched model's original classes and drop its pruning state; other models are returned
    as they are."""
    if not is_patched(model):
        return model
    state: PruneState = model.renyiprune
    for m in [model, *model.modules()]:
        cls = state.original_classes.get(id(m))
        if cls is not None:
            m.__class__ = cls
        for attr in ("_renyiprune", "_renyiprune_stage", "_renyiprune_block"):
            m.__dict__.pop(attr, None)
    del model.renyiprune
    return model


def records(model: nn.Module) -> list[StageRecord]:
    """What each pruning location did in ``model``'s last forward, in order (``model.renyiprune.records``;
    empty for ToMe merging and before the first forward)."""
    if not is_patched(model):
        raise ValueError(
            f"{type(model).__name__} is not patched by renyiprune, so it keeps no records; "
            "call prune, merge or patch on it first"
        )
    return list(model.renyiprune.records)
