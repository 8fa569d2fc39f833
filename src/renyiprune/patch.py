"""Make an existing ViT prune tokens in place: ``patch(model, ...)`` / ``unpatch(model)``.

Like ToMe's ``tome.patch.timm``, patching swaps the classes of the model and of the blocks at the
pruning locations for subclasses; all configuration and the records of the last forward live in
one ``PruneState`` object at ``model.renyiprune``, shared by those blocks. Nothing is copied, so the
weights stay the user's.

After a forward, ``model.renyiprune.records[i]`` holds, for the i-th pruning location:
``kept`` (B, k) indices into that stage's n candidate tokens, ``patch_index`` (B, k) the original
patch numbers (0..num_patches-1, row-major on the grid) of the survivors, and ``scores`` (B, n).
With EViT's fusion (``fusion="evit"``, the default) a fused token of an earlier stage is a candidate
too (the last of the n); when it survives, its ``patch_index`` is -1 (it is no original patch).

A pruning block computes only what its criterion declares it needs (``streamed.attend``: fused SDPA plus
the CLS row for EViT-like criteria, queries in chunks for entropies and column statistics), never the
(B, H, N, N) attention matrix; ``model.renyiprune.attention = "explicit"`` restores the explicit matrix
(also used under autograd and while exporting).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters import check_model, find_adapter
from .budget import tome_schedule
from .context import FULL, Needs
from .criteria import (
    CRITERIA,
    AttentionContext,
    Criterion,
    attention_logits,
    criterion_options,
    make_criterion,
    standardize,
)
from .entropy import check_alpha
from .merge_order import get_merge_order
from .merging import bipartite_matching, merge_into_kept
from .selection import check_fusion, check_keep_rate, keep_count, select_tokens, top_k_sorted
from .streamed import attend

__all__ = ["patch", "unpatch", "share_parameters", "PruneState", "StageConfig", "StageRecord", "is_patched"]


@dataclass
class StageConfig:
    """How one pruning location prunes."""

    location: int
    keep_rate: float
    criterion: Criterion
    name: str
    tokens: int | None = None  # patches kept, instead of a rate

    def keep(self, n: int) -> int:
        """Patches kept out of ``n``."""
        return min(n, self.tokens) if self.tokens is not None else keep_count(n, self.keep_rate)


@dataclass
class StageRecord:
    """What one pruning location did in the last forward."""

    location: int
    kept: Tensor
    patch_index: Tensor
    scores: Tensor
    num_fused: int


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
    fuse: bool
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
    # Filled during a forward:
    step: int = 0
    records: list[StageRecord] = field(default_factory=list)
    patch_index: Tensor | None = None  # (B, n) original patch of each candidate token, -1: fused token
    size: Tensor | None = None  # (B, N, 1) patches per token, once tokens have been merged

    @property
    def locations(self) -> tuple[int, ...]:
        """Blocks that change the token set."""
        if self.method == "tome":
            return tuple(i for i, r in enumerate(self.merge_r) if r > 0)
        return tuple(s.location for s in self.stages)

    def begin(self, batch: int, num_patches: int, device: torch.device) -> None:
        self.records = []
        self.size = None
        self.patch_index = torch.arange(num_patches, device=device).expand(batch, -1)

    def key_bias(self) -> Tensor | None:
        """Proportional attention: log(size) of every key, (B, 1, 1, N), or None before any merge."""
        return None if self.size is None else self.size.log().transpose(1, 2).unsqueeze(1)

    def sizes(self, x: Tensor) -> Tensor:
        return self.size if self.size is not None else x.new_ones(x.shape[0], x.shape[1], 1)

    def describe(self) -> str:
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
    return isinstance(getattr(model, "renyiprune", None), PruneState)


def _ranking_qkv(attn: nn.Module, x: Tensor):
    """The block's (q, k, v) and the context its ranking attention runs in.

    Rankings are sensitive to rounding: in float16/bfloat16 (weights or autocast) the ranking attention
    runs in float32 with autocast off (bfloat16 logits of magnitude ~10 are rounded to 1/16); under
    autocast the q, k, v projection runs in float32 as well.
    """
    full = torch.autocast(x.device.type, enabled=False)
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        # Autocast over float32 weights: project in float32 too, so that q and k carry no bfloat16
        # rounding (~0.4 % of each logit) into the ranking.
        with full:
            return attn.qkv_heads(x), full
    q, k, v = attn.qkv_heads(x)
    if q.dtype not in (torch.float16, torch.bfloat16):
        return (q, k, v), contextlib.nullcontext()
    return (q, k, v), full


def _explicit_qkv(attn: nn.Module, x: Tensor):
    """(q, k, v), the float32 (q, k, v) the explicit attention runs on, and the context to run it in."""
    (q, k, v), precision = _ranking_qkv(attn, x)
    if q.dtype not in (torch.float16, torch.bfloat16):
        return (q, k, v), (q, k, v), precision
    return (q, k, v), (q.float(), k.float(), v.float()), precision


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast would cast the attention output to before the projection (None: no autocast):
    producing it directly rounds the same way and never holds a float32 copy of the output."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _streams(state: PruneState, x: Tensor) -> bool:
    """Whether a block may take the streamed path: not when asked for the explicit one, not with autograd
    through the attention (the chunks write into buffers), not while tracing or exporting."""
    if state.attention == "explicit" or (torch.is_grad_enabled() and x.requires_grad):
        return False
    return not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting())


def _pruning_attention(
    attn: nn.Module, x: Tensor, criterion: Criterion, ctx_kw: dict, bias: Tensor | None, state: PruneState
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Attention of a pruning block: (output, scores (B, n), cls_attn (B, N) or None, metric).

    Computes what the criterion declared (``criterion.needs``; the CLS row too when pruned tokens are
    fused) through ``streamed.attend``; the explicit matrix when the criterion needs it or the block may
    not stream (``_streams``). ``metric``: the head-mean keys (B, N, d) when pruned tokens are merged,
    else None; q, k, v (views of the whole qkv projection) are released before the output projection.
    """
    needs = getattr(criterion, "needs", FULL) | Needs(cls_row=state.removed == "fuse")
    merge = state.removed == "merge"
    if needs.full or not _streams(state, x):
        y, scores, cls_attn, keys = _scored_attention(attn, x, criterion, ctx_kw, bias)
        return y, scores, cls_attn, keys.mean(dim=1) if merge else None
    out_dtype = _autocast_dtype(x)
    (q, k, v), precision = _ranking_qkv(attn, x)
    with precision:
        out, ctx = attend(q, k, v, attn.scale, needs, bias=bias, chunk_bytes=state.chunk_bytes,
                          out_dtype=out_dtype, **ctx_kw)  # fmt: skip
        with torch.no_grad():  # scores only rank tokens; no gradient flows through the ranking
            scores = criterion(ctx)
        cls_attn = ctx.cls_attn if needs.cls_row else None
    metric = k.mean(dim=1) if merge else None
    del q, k, v, ctx
    return attn.merge_heads(out), scores, cls_attn, metric


def _scored_attention(
    attn: nn.Module, x: Tensor, criterion: Criterion, ctx_kw: dict, bias: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Attention with explicit logits: returns (output, scores (B, n), cls_attn (B, N), keys).

    ``bias`` (proportional attention, log token sizes) is added to the logits; the criterion then
    reads the biased logits directly (the in-place fast path assumes logits = c q k^T).

    The logits are computed once; the criterion reads them (or cached views) first, then the same
    buffer becomes the probabilities in place for the output, so one (B, H, N, N) tensor is alive at
    a time. The built-in criteria derive their scores from those probabilities (``row_entropy``).
    """
    (q, k, v), (qf, kf, vf), precision = _explicit_qkv(attn, x)
    with precision:
        logits = attention_logits(qf, kf, attn.scale)  # (B, H, N, N)
        if bias is None:
            ctx = AttentionContext(
                logits, **ctx_kw, query=qf, key=kf, value=vf, scale=attn.scale, reuse_logits=True
            )
        else:
            ctx = AttentionContext(logits.add_(bias.to(logits.dtype)), **ctx_kw, key=kf, value=vf)
        del logits  # the context owns the buffer
        with torch.no_grad():  # scores only rank tokens; no gradient flows through the ranking
            scores = criterion(ctx)
        out = ctx.probs @ vf
        cls_attn = ctx.cls_attn
    return attn.merge_heads(out.to(v.dtype)), scores, cls_attn, k


class _PruningBlock:
    """Mixin placed before a Block class: attention, residual, token selection, then the MLP."""

    _renyiprune: PruneState
    _renyiprune_stage: int

    def forward(self, x: Tensor) -> Tensor:
        state = self._renyiprune
        cfg = state.stages[self._renyiprune_stage]
        n = state.patch_index.shape[1]
        y, scores, cls_attn, metric = _pruning_attention(
            self.attn,
            self.norm1(x),
            cfg.criterion,
            dict(num_patches=n, stage=self._renyiprune_stage, step=state.step, num_prefix=state.num_prefix),
            state.key_bias(),
            state,
        )
        x = x + self.drop_path1(y)
        k = cfg.keep(n)
        if state.removed == "merge":
            kept = top_k_sorted(scores, k)
            x, state.size = merge_into_kept(x, state.size, metric, kept, n, state.num_prefix)
        else:
            x, kept = select_tokens(x, scores, k, cls_attn=cls_attn, fuse=state.removed == "fuse",
                                    num_prefix=state.num_prefix, fusion=state.fusion)  # fmt: skip
        survivors = state.patch_index.gather(1, kept)
        fused = x.shape[1] - state.num_prefix - k
        state.records.append(StageRecord(cfg.location, kept, survivors, scores, num_fused=fused))
        if fused and state.fusion == "evit":  # the new fused token is a candidate at the next stage
            survivors = torch.cat([survivors, survivors.new_full((survivors.shape[0], 1), -1)], dim=1)
        state.patch_index = survivors
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def _biased_attention(attn: nn.Module, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Fused attention with an additive key bias (proportional attention); returns (output, keys)."""
    q, k, v = attn.qkv_heads(x)
    mask = None if bias is None else bias.to(q.dtype)
    return attn.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)), k


class _SizedBlock:
    """Mixin for blocks after a merge: the same block, with proportional attention."""

    _renyiprune: PruneState

    def forward(self, x: Tensor) -> Tensor:
        state = self._renyiprune
        if state.size is None:
            return super().forward(x)
        y, _ = _biased_attention(self.attn, self.norm1(x), state.key_bias())
        x = x + self.drop_path1(y)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class _MergingBlock:
    """Mixin for ToMe: attention (proportional), then merge r tokens by bipartite soft matching."""

    _renyiprune: PruneState
    _renyiprune_block: int

    def forward(self, x: Tensor) -> Tensor:
        state = self._renyiprune
        r = state.merge_r[self._renyiprune_block]
        bonus = None
        if r > 0 and state.entropy_weight:
            y, keys, bonus = _entropy_attention(self.attn, self.norm1(x), state.key_bias(), state)
        else:
            y, keys = _biased_attention(self.attn, self.norm1(x), state.key_bias())
        metric = keys.mean(dim=1) if r > 0 else None
        del keys  # a view of the whole qkv projection
        x = x + self.drop_path1(y)
        if r > 0:
            matching = bipartite_matching(metric, r, bonus=bonus, num_prefix=state.num_prefix)
            x, state.size = matching.merge(x, state.size)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


# The built-in merge orders (merge_order.py) from a streamed context: (needs, score) for an order alpha;
# the same formulas as their explicit versions, which take the full logits.
_STREAMED_ORDERS = {
    "entropy": (lambda a: Needs(row_entropy=(a,)), lambda ctx, a: ctx.row_entropy(a).mean(dim=1)),
    "cls_attention": (lambda a: Needs(cls_row=True), lambda ctx, a: ctx.cls_attn.neg()),
}


def _entropy_attention(attn: nn.Module, x: Tensor, bias: Tensor | None, state: PruneState):
    """Attention that also returns a merge-order bonus for the A tokens (even positions): entropy_weight x
    the state's merge order (default: the z-scored Rényi row entropy, mean over heads). The built-in
    orders stream (``streamed.attend`` over every token); others get the explicit logits. As in a
    pruning block, float16/bfloat16 ranking attention runs in float32 here."""
    order = _STREAMED_ORDERS.get(state.merge_order)
    if order is not None and _streams(state, x):
        needs, score = order
        out_dtype = _autocast_dtype(x)
        (q, k, v), precision = _ranking_qkv(attn, x)
        with precision:
            out, ctx = attend(q, k, v, attn.scale, needs(state.entropy_alpha), bias=bias, num_prefix=0,
                              chunk_bytes=state.chunk_bytes, out_dtype=out_dtype)  # fmt: skip
            with torch.no_grad():
                z = standardize(score(ctx, state.entropy_alpha), eps=1e-6)  # as merge_order.py
        bonus = (state.entropy_weight * z[:, ::2]).to(q.dtype)
        del ctx, q, v
        return attn.merge_heads(out), k, bonus
    (q, k, v), (qf, kf, vf), precision = _explicit_qkv(attn, x)
    with precision:
        logits = attention_logits(qf, kf, attn.scale)
        if bias is not None:
            logits = logits.add_(bias.to(logits.dtype))
        with torch.no_grad():
            z = get_merge_order(state.merge_order)(logits, state.entropy_alpha)  # (B, N)
        out = logits.softmax(dim=-1) @ vf
    return attn.merge_heads(out.to(v.dtype)), k, (state.entropy_weight * z[:, ::2]).to(q.dtype)


class _PrunedModel:
    """Mixin placed before the model class: resets the per-forward state, then runs the model."""

    renyiprune: PruneState

    def forward(self, x: Tensor) -> Tensor:
        state = self.renyiprune
        state.begin(x.shape[0], self.patch_embed.num_patches, x.device)
        out = super().forward(x)
        state.step += 1
        return out


def _subclass(mixin: type, cls: type) -> type:
    return type(f"Pruning{cls.__name__}", (mixin, cls), {})


def _check_model(model: nn.Module) -> Sequence[nn.Module]:
    """The model's blocks; an UnsupportedModelError (a TypeError) naming what is missing otherwise."""
    return check_model(model)


def _per_stage(value, count: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{what}: got {len(value)} values for {count} pruning locations")
        return list(value)
    return [value] * count


def patch(
    model: nn.Module,
    keep_rate: float | Sequence[float] = 0.7,
    criterion: str | Criterion | Sequence[str | Criterion] = "renyi",
    alpha: float | Sequence[float] = 1.0,
    locations: Sequence[int] = (3, 6, 9),
    fuse: bool = False,
    *,
    removed: str | None = None,
    method: str = "prune",
    r: int | Sequence[int] = 16,
    schedule: str = "constant",
    budget: float | None = None,
    tokens: int | Sequence[int] | None = None,
    fusion: str | None = None,
    **criterion_options,
) -> nn.Module:
    """Make ``model`` reduce its tokens in place and return it.

    ``method="prune"`` (EViT-style): at each block in ``locations`` (0-based), after the attention
    residual and before the MLP, ceil(keep_rate * n) of the n current patch tokens with the highest
    criterion score are kept (CLS always). ``keep_rate``, ``criterion`` and ``alpha`` may be one value
    or one per location; ``alpha`` goes to criteria that take it, other options to the criterion.
    ``removed`` decides the fate of pruned tokens: ``drop`` (default), ``fuse`` (one extra token
    weighted by CLS attention; ``fuse=True`` is the same) or ``merge`` (into the most similar kept
    token, with proportional attention afterwards). ``fusion`` picks the fusion rule: ``"evit"``
    (default; EViT's official code: raw CLS-attention weights, and the fused token is ranked, counted
    and possibly fused again at later locations like any patch) or ``"renorm"`` (weights renormalized
    over the fused tokens, the fused token never ranked and always carried).
    ``method="tome"``: ToMe's bipartite soft matching merges ``r`` tokens after every block (an int,
    one int per block, or ``schedule="decreasing"``: 2r at the first block down to 0 at the last).
    ``tokens``: patches kept at each location (one int or one per location) instead of a keep rate.
    ``budget=F`` solves the keep rate (prune) or r (tome) for the largest GMACs <= F x unpruned;
    with ``criterion="best"`` the shipped policy's method for the nearest tuned budget is used.
    Patching a patched model reconfigures it.
    """
    adapter = find_adapter(model)
    if adapter is not None:  # Hugging Face / timm: their layers get our block interface, then this patch
        return adapter(
            model, patch, keep_rate=keep_rate, criterion=criterion, alpha=alpha, locations=locations,
            fuse=fuse, removed=removed, method=method, r=r, schedule=schedule, budget=budget,
            **({"tokens": tokens} if tokens is not None else {}),
            **({"fusion": fusion} if fusion is not None else {}), **criterion_options,
        )  # fmt: skip
    if method not in ("prune", "tome"):
        raise ValueError(f"method must be 'prune' or 'tome', got {method!r}")
    removed = removed or ("fuse" if fuse else "drop")
    if removed not in ("drop", "fuse", "merge"):
        raise ValueError(f"removed must be drop, fuse or merge, got {removed!r}")
    if fusion is not None and (removed != "fuse" or method != "prune"):
        raise ValueError(f"fusion={fusion!r} applies to fused pruning only (fuse=True or removed='fuse')")
    fusion = check_fusion(fusion)
    blocks = _check_model(model)
    if budget is not None and tokens is not None:
        raise ValueError("pass either budget or tokens, not both")
    if criterion == "best" and budget is not None and method == "prune":
        tuned = _best_for_budget(model, budget)
        if tuned is not None:  # the policy chose a method for this budget (pruning, merging or ToMe)
            return patch(model, **{**tuned, **criterion_options, "budget": budget})
    if budget is not None:
        keep_rate, r = _solve_budget(model, budget, method, locations, removed, schedule, fusion)
    if method == "tome":
        weight = float(criterion_options.pop("entropy_weight", 0.0))
        order = str(criterion_options.pop("merge_order", "entropy"))
        get_merge_order(order)  # unknown names fail here
        if criterion_options:
            raise ValueError(f"method tome takes no option {', '.join(sorted(criterion_options))}")
        merge_r = tome_schedule(r, schedule, len(blocks))
        return _patch_tome(model, blocks, merge_r, weight, check_alpha(_first(alpha)), order)
    if isinstance(criterion, str) and criterion == "best":  # the shipped tuned policy's choice
        criterion, alpha, locations, criterion_options = _resolve_best(
            model, keep_rate, locations, criterion_options
        )
    if is_patched(model):
        unpatch(model)
    locs = [int(i) for i in locations]
    if any(i < 0 or i >= len(blocks) for i in locs):
        raise ValueError(f"locations {locs} out of range for a model with {len(blocks)} blocks (0-based)")
    if locs != sorted(set(locs)):
        raise ValueError(f"locations must be increasing and distinct, got {locs}")
    rates = [check_keep_rate(r) for r in _per_stage(keep_rate, len(locs), "keep_rate")]
    counts = [None] * len(locs)
    if tokens is not None:
        counts = [int(t) for t in _per_stage(tokens, len(locs), "tokens")]
        if any(t < 1 for t in counts):
            raise ValueError(f"tokens must be >= 1 patch per location, got {counts}")
    crits = _per_stage(criterion, len(locs), "criterion")
    alphas = _per_stage(alpha, len(locs), "alpha")
    stages = []
    for loc, r, c, a, t in zip(locs, rates, crits, alphas, counts, strict=True):
        opts = dict(criterion_options)
        if not callable(c) and "alpha" in _options_of(c):
            opts["alpha"] = a
        name = getattr(c, "__name__", "custom") if callable(c) else c
        if "alpha" in opts:
            name = f"{name}(a={a:g})"
        stages.append(StageConfig(loc, r, make_criterion(c, **opts), name, tokens=t))
    state = PruneState(stages=stages, fuse=removed == "fuse", removed=removed, fusion=fusion)
    _attach(model, state)
    for si, loc in enumerate(locs):
        _swap(blocks[loc], _PruningBlock, state)
        blocks[loc]._renyiprune_stage = si
    if removed == "merge" and locs:  # proportional attention in every block after the first merge
        for b in blocks[locs[0] + 1 :]:
            if not hasattr(b, "_renyiprune"):
                _swap(b, _SizedBlock, state)
    if budget is not None and tokens is None and hasattr(model, "patch_embed"):
        _fit_counted_budget(model, state, budget)
    return model


def _fit_counted_budget(model: nn.Module, state: PruneState, budget: float) -> None:
    """Lower the solved common keep rate, one first-location patch at a time, until the counted GMACs
    fit the budget: the solver counts the blocks and merging, not the criterion's own products
    (Shannon's p @ K, ``diverse``'s key similarities), which FlopCounterMode sees."""
    from .budget import VitShape
    from .flops import count_gmacs

    shape = VitShape.of(model)
    target = budget * shape.gmacs(shape.unpruned()) * (1 + 1e-9)
    step = 1.0 / model.patch_embed.num_patches
    while count_gmacs(model) > target:
        rate = state.stages[0].keep_rate - step
        if rate <= 0:
            raise ValueError(f"budget {budget} is below what this criterion can reach at these locations")
        for stage in state.stages:
            stage.keep_rate = rate


def _attach(model: nn.Module, state: PruneState) -> None:
    state.num_prefix = int(getattr(model, "num_prefix_tokens", 1))
    state.original_classes[id(model)] = model.__class__
    model.__class__ = _subclass(_PrunedModel, model.__class__)
    model.renyiprune = state


def _swap(block: nn.Module, mixin: type, state: PruneState) -> None:
    state.original_classes[id(block)] = block.__class__
    block.__class__ = _subclass(mixin, block.__class__)
    block._renyiprune = state


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def _patch_tome(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    merge_r: list[int],
    entropy_weight: float,
    alpha: float,
    merge_order: str = "entropy",
) -> nn.Module:
    if is_patched(model):
        unpatch(model)
    state = PruneState(stages=[], fuse=False, removed="merge", method="tome", merge_r=merge_r,
                       entropy_weight=entropy_weight, entropy_alpha=alpha, merge_order=merge_order)
    _attach(model, state)
    for i, b in enumerate(blocks):
        _swap(b, _MergingBlock, state)
        b._renyiprune_block = i
    return model


def _solve_budget(model, budget: float, method: str, locations, removed: str, schedule: str, fusion: str):
    """(keep_rate, r) meeting a GMACs budget for this model and method."""
    from .budget import VitShape, solve_keep_rate, solve_tome_r

    shape = VitShape.of(model)
    if method == "tome":
        return None, solve_tome_r(shape, budget, schedule)
    rate = solve_keep_rate(shape, budget, tuple(locations), fuse=removed == "fuse", merge=removed == "merge",
                           fusion=fusion)
    return rate, None


def _model_name(model: nn.Module) -> str:
    return getattr(getattr(model, "pretrained_cfg", None), "name", "deit_tiny_patch16_224")


def _best_for_budget(model: nn.Module, budget: float) -> dict | None:
    """criterion="best" with a budget: patch() arguments of the policy's choice at the nearest tuned
    budget; None when the policy was tuned per keep rate only."""
    from .policy import resolve_budget

    return resolve_budget(float(budget), _model_name(model))


def _resolve_best(model: nn.Module, keep_rate, locations, options: dict) -> tuple:
    """criterion="best": (criterion, alpha, locations, options) from the policy shipped for this model;
    a per-stage choice ('headvar@3+evit@6+evit@9') brings its own locations."""
    from .evaluate import parse_stages
    from .policy import resolve_best

    if isinstance(keep_rate, (list, tuple)):
        raise ValueError('criterion="best" takes one keep_rate')
    crit, alpha, tuned = resolve_best(float(keep_rate), _model_name(model))
    if "@" in crit:
        crit, alpha, locations = parse_stages(crit)
    return crit, alpha, locations, {**tuned, **options}


def share_parameters(model: nn.Module) -> nn.Module:
    """A copy of the module tree whose modules share ``model``'s parameters and buffers.

    Patching the copy swaps only the copy's classes, so several pruning configurations of one
    model can live side by side without duplicating weights.
    """
    if is_patched(model):
        raise ValueError("share_parameters expects an unpatched model")
    clone = copy.copy(model)  # new __dict__; _parameters/_buffers dicts stay shared
    clone._modules = {name: share_parameters(child) for name, child in model._modules.items()}
    return clone


def _options_of(name: str) -> dict:
    return criterion_options(CRITERIA[name]) if name in CRITERIA else {}


def unpatch(model: nn.Module) -> nn.Module:
    """Restore a patched model's original classes and drop its pruning state."""
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
