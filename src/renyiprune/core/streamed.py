"""The one attention pipeline of a pruning (or merging) block: compute what the criterion needs, no more.

``attend`` returns the attention output and a context holding what ``needs`` (``attention.Needs``)
declares, by one of three cases:
- ``Needs(full=True)``, or a block that may not stream (``Site.explicit``: autograd, tracing, export,
  ``attention="explicit"``): the explicit (B, H, N, N) attention in one buffer (``explicit_context``);
- only the CLS row, keys or values: fused SDPA for the output, plus the CLS query's row (q_cls . K^T);
- row entropies or column statistics: the queries in chunks of images, or of query rows of one image.
  Each chunk's logits (b, H, c, N) get the key bias, then the softmax in place, and ``Statistics`` folds
  the probabilities in. The cost model sizes the chunks: ``memory_budget`` bounds the buffer so that the
  block's peak memory stays at or below the unpruned block's (rows of one image when one image does not
  fit), and ``CACHE_BYTES`` bounds how many whole images share one buffer, because a buffer larger than
  that runs slower, not faster (docs/performance.md, "Cost model").
float16/bfloat16 q and k are upcast to float32 one image at a time, so rankings use float32 logits; the
output then comes from the half-precision SDPA, as in an unpatched block. ``score_block`` is the same for
a block module: its q, k, v, this pipeline and the criterion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import (
    FULL,
    AttentionContext,
    Chunk,
    Needs,
    Operands,
    Site,
    Statistics,
    ranking_qkv,
    softmax_in_place,
)
from .entropy import accumulation_dtype

__all__ = [
    "attend", "score_block", "explicit_context", "may_stream", "StreamedContext", "memory_budget",
    "chunk_plan", "CACHE_BYTES", "tracing_or_exporting",
]  # fmt: skip

Scorer = Callable[[AttentionContext], Tensor]
_WHOLE = Site()  # the default: one image block, CLS first, stage 0


class StreamedContext(AttentionContext):
    """An attention context filled by ``attend`` with what the criterion declared, and nothing else.

    Reading something that was not declared (the full ``logits``/``probs``, an undeclared Rényi order,
    ...) raises a ValueError that names the ``Needs`` field to declare.
    """

    def __init__(self, needs: Needs, values: dict[str, object], site: Site, operands: Operands):
        super().__init__(None, site.num_patches, site.stage, site.step, operands=operands,
                         num_prefix=site.num_prefix)  # fmt: skip
        self.needs = needs
        self._values = values  # Statistics.result(): {Needs field: value}

    def __repr__(self) -> str:
        return f"StreamedContext({self.needs}, num_patches={self.num_patches}, stage={self.stage})"

    def _missing(self, what: str, field: str) -> ValueError:
        return ValueError(f"this criterion read {what}, which it did not declare: add {field} to its needs "
                          f"(register_criterion(..., needs=Needs({field}))); declared: {self.needs}")

    @property
    def batch_size(self) -> int:
        return self._ops.query.shape[0]

    @property
    def device(self) -> torch.device:
        return self._ops.query.device

    @property
    def logits(self) -> Tensor:
        raise self._missing("the full attention logits", "full=True")

    @property
    def probs(self) -> Tensor:
        raise self._missing("the full attention probabilities", "full=True")

    def _statistic(self, field: str, order: float | None = None):
        value = self._values.get(field)
        if order is not None:  # a Rényi order, an l_n norm or a registered statistic's name
            value = (value or {}).get(order)
        if value is None:
            hint = f"{field}=({order!r},)" if order is not None else f"{field}=True"
            raise self._missing(f"{field}" + (f" {order!r}" if order is not None else ""), hint)
        return value

    @property
    def cls_rows(self) -> Tensor:
        return self._statistic("cls_row")

    def row_entropy(self, alpha: float) -> Tensor:
        return self.patches(self._statistic("row_entropy", float(alpha)), dim=2)

    @property
    def key(self) -> Tensor:
        if not (self.needs.key or self.needs.full):
            raise self._missing("the keys", "key=True")
        return self._ops.key

    @property
    def value(self) -> Tensor:
        if not (self.needs.value or self.needs.full):
            raise self._missing("the values", "value=True")
        return self._ops.value


def memory_budget(batch: int, tokens: int, width: int, act_size: int, qkv_size: int | None = None) -> int:
    """Bytes the attention buffer of a pruning block may take so that its peak memory stays at or below
    the unpruned block's (docs/performance.md, "Cost model").

    With M = B N C: the unpruned block's peak, beyond its input and normed input, is the MLP's hidden
    activation before and after GELU, 8 M elements of ``act_size`` bytes. The pruning block's attention
    holds q, k, v (3 M of ``qkv_size``: float32 under autocast) and its output (M of ``act_size``):
    budget = 8 M a - 3 M q - M a (4 M a without autocast), and at least one activation, M a. SDPA's CPU
    workspace (a few rows per thread) is left out.
    """
    m = batch * tokens * width
    qkv_size = act_size if qkv_size is None else qkv_size
    return max(8 * m * act_size - 3 * m * qkv_size - m * act_size, m * act_size)


#: Bytes of logits beyond which more whole images per chunk make a pruning block slower, not faster
#: (``benchmarks/chunk_size.py``, docs/performance.md "Cost model"): on DeiT-S shapes, chunks of 1-16
#: images at 197 tokens ran within 7 % of the fastest (8 images, 7.1 MiB), and the whole batch of 64 took
#: 1.6x as long; at 577 tokens one image (7.6 MiB) was fastest and 2, 4, 16 took 1.1-1.2x, 1.3x, 1.8x. Each
#: pass (logits, softmax, statistics, output) re-reads a buffer that large from memory.
CACHE_BYTES = 8 << 20


def chunk_plan(
    batch: int, heads: int, n: int, bytes_per_logit: float, budget: int, cache_bytes: int | None = None
) -> tuple[int, int]:
    """(images, query rows) per chunk so that its (images, heads, rows, n) logits fit ``budget`` bytes.

    ``bytes_per_logit``: what one logit of the chunk takes with the temporaries folded in (4.5 for a
    float32 chunk plus a temporary of an eighth of it). Whole images when one fits (as many per chunk as
    fit both ``budget`` and ``cache_bytes``, at least one, up to the batch), else rows of one image (at
    least one row). ``cache_bytes=None``: no cap. A pruning block passes ``CACHE_BYTES`` (read at each call).
    """
    if budget < 1:
        raise ValueError(f"chunk budget must be a positive number of bytes, got {budget}")
    per_row = heads * n * bytes_per_logit
    rows = max(1, int(budget // per_row))
    if rows < n:
        return 1, rows
    images = rows // n
    if cache_bytes is not None:
        images = min(images, int(cache_bytes // (per_row * n)))
    return max(1, min(batch, images)), n


def tracing_or_exporting() -> bool:
    """Whether the forward is being traced (torch.jit) or exported (ONNX, torch.export) into a graph."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def may_stream(x: Tensor) -> bool:
    """Whether a block's attention may be computed in chunks: not with autograd through it (the chunks
    write into buffers), not while tracing or exporting."""
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    return not tracing_or_exporting()


def attend(
    ops: Operands, needs: Needs, site: Site = _WHOLE, score: Scorer | None = None
) -> tuple[Tensor, AttentionContext, Tensor | None]:
    """Attention output (B, H, N, d) of softmax(scale q k^T + bias) v, the context, and ``score(ctx)``.

    q, k, v: (B, H, N, d) in ``ops``. ``score`` (a criterion) runs without autograd, before the
    explicit path turns its logits into probabilities, so a criterion that reads the logits gets them
    without a recomputation. The output has ``site.out_dtype`` (default: v's).
    """
    B, H, N, d = ops.query.shape
    if site.num_patches is None:
        site = replace(site, num_patches=N - site.num_prefix)
    out_dtype = site.out_dtype or ops.value.dtype
    if needs.full or site.explicit:
        return _explicit(ops, site, out_dtype, score)
    if needs.per_query:
        out, values = _chunked(ops, needs, site, out_dtype)
    else:
        out, values = _fused(ops, needs, out_dtype)
    ctx = StreamedContext(needs, values, site, ops)
    return out, ctx, _run(score, ctx)


def _run(score: Scorer | None, ctx: AttentionContext) -> Tensor | None:
    """Scores only rank tokens: no gradient flows through the ranking."""
    if score is None:
        return None
    with torch.no_grad():
        return score(ctx)


def explicit_context(logits: Tensor, site: Site, operands: Operands | None = None) -> AttentionContext:
    """The context of explicit (B, H, N, N) ``logits``; with the ``operands`` they came from, the
    probabilities are made in place of the logits (one buffer) and entropies come from them."""
    n = logits.shape[-1] - site.num_prefix if site.num_patches is None else site.num_patches
    return AttentionContext(logits, n, site.stage, site.step, operands=operands,
                            reuse_logits=operands is not None, num_prefix=site.num_prefix)  # fmt: skip


def _explicit(ops: Operands, site: Site, out_dtype: torch.dtype, score: Scorer | None):
    """The explicit case: one (B, H, N, N) logits buffer, in float32 for half-precision inputs."""
    acc = accumulation_dtype(ops.query)
    bias = None if ops.bias is None else ops.bias.to(acc)
    full = Operands(ops.query.to(acc), ops.key.to(acc), ops.value.to(acc), ops.scale, bias)
    ctx = explicit_context(full.logits(), site, full)
    scores = _run(score, ctx)
    return (ctx.probs @ full.value).to(out_dtype), ctx, scores


def _fused(ops: Operands, needs: Needs, out_dtype: torch.dtype):
    """Fused SDPA for the output; the CLS query's row per head when declared, for the whole batch."""
    B, H, N, d = ops.query.shape
    out = _sdpa(ops, out_dtype)
    stats = Statistics(Needs(cls_row=needs.cls_row), (B, H, N), ops.query)
    if needs.cls_row:
        stats.add(Chunk(_cls_rows(ops).softmax(dim=-1), slice(None), slice(0, 1)))
    return out, stats.result()


def _sdpa(ops: Operands, out_dtype: torch.dtype) -> Tensor:
    """The attention output by fused SDPA in the operands' own dtype, as an unpatched block computes it."""
    mask = None if ops.bias is None else ops.bias.to(ops.query.dtype)
    return F.scaled_dot_product_attention(ops.query, ops.key, ops.value, attn_mask=mask,
                                          scale=ops.scale).to(out_dtype)  # fmt: skip


def _cls_rows(ops: Operands) -> Tensor:
    """The CLS query's logits (B, H, 1, N), one head at a time: k[:, h] (B, N, d) is a strided view of the
    qkv projection that bmm reads in place, where one (B, H) batched product would copy all the keys.
    float32 for half-precision operands (one head's keys at a time: within any memory_budget)."""
    q, k = ops.query, ops.key
    B, H, N, d = q.shape
    acc = accumulation_dtype(q)
    s = torch.empty(H, B, 1, N, dtype=acc, device=q.device)
    for h in range(H):
        torch.baddbmm(s[h], q[:, h, :1].to(acc), k[:, h].to(acc).transpose(1, 2), beta=0, alpha=ops.scale,
                      out=s[h])  # fmt: skip
    s = s.transpose(0, 1)
    return s if ops.bias is None else s + ops.bias.to(acc)


def _plan(ops: Operands, site: Site, buffers: float, out_dtype: torch.dtype) -> tuple[int, int]:
    """``chunk_plan`` for these operands: the cost model's budgets, or the site's ``chunk_bytes`` alone."""
    B, H, N, d = ops.query.shape
    acc_size = torch.finfo(accumulation_dtype(ops.query)).bits // 8
    if site.chunk_bytes is not None:
        return chunk_plan(B, H, N, acc_size * buffers, site.chunk_bytes)
    act_size = torch.finfo(out_dtype).bits // 8
    budget = memory_budget(B, N, H * d, act_size, ops.query.element_size())
    if acc_size > ops.query.element_size():  # half precision: an image's q and k upcast for its logits
        budget = max(budget - 2 * N * H * d * acc_size, H * N * acc_size)
    return chunk_plan(B, H, N, acc_size * buffers, budget, CACHE_BYTES)


def _chunked(ops: Operands, needs: Needs, site: Site, out_dtype: torch.dtype):
    """Queries in chunks: logits, key bias, softmax in place, statistics and output rows per chunk.

    The matmuls run per image on the (H, rows, d) views of the qkv projection, which need no copies.
    """
    q, k, v, scale = ops.query, ops.key, ops.value, ops.scale
    B, H, N, d = q.shape
    acc = accumulation_dtype(q)
    stats = Statistics(needs, (B, H, N), q)
    images, rows = _plan(ops, site, stats.chunk_buffers(), out_dtype)
    # float16/bfloat16: the chunks' float32 probabilities feed the statistics only, and the output comes
    # from the fused half-precision SDPA, which runs several times faster than a float32 product with v.
    half = acc != q.dtype
    out = _sdpa(ops, out_dtype).transpose(1, 2) if half else v.new_empty(B, N, H, d, dtype=out_dtype)
    flat = torch.empty(images * H * rows * N, dtype=acc, device=q.device)
    for b0 in range(0, B, images):
        bs = slice(b0, min(B, b0 + images))
        bias = None if ops.bias is None else ops.bias[bs].to(acc)
        for i0 in range(0, N, rows):
            rs = slice(i0, min(N, i0 + rows))
            c = rs.stop - i0
            s = flat[: (bs.stop - b0) * H * c * N].view(bs.stop - b0, H, c, N)
            for j in range(bs.stop - b0):  # s = scale q k^T, the scale applied inside the GEMM
                torch.baddbmm(s[j], q[b0 + j, :, rs].to(acc), k[b0 + j].to(acc).transpose(1, 2), beta=0,
                              alpha=scale, out=s[j])  # fmt: skip
            if bias is not None:
                s.add_(bias)
            stats.from_logits(s, bs, rs)
            p = softmax_in_place(s)
            stats.add(Chunk(p, bs, rs, q[bs, :, rs], k[bs], scale, bias))
            for j in range(0 if half else bs.stop - b0):  # output rows from the same probabilities
                _store(out[b0 + j, rs], torch.bmm(p[j], v[b0 + j].to(acc)))
    return out.transpose(1, 2), stats.result()


def _store(dst: Tensor, rows: Tensor) -> None:
    """Write one image's output rows (H, c, d) into its (c, H, d) slice of the output."""
    dst.copy_(rows.transpose(0, 1))


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast would cast the attention output to before the projection (None: no autocast):
    producing it directly rounds the same way and never holds a float32 copy of the output."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def score_block(
    attn: nn.Module,
    x: Tensor,
    score: Scorer,
    site: Site = _WHOLE,
    bias: Tensor | None = None,
    needs: Needs | None = None,
) -> tuple[Tensor, Tensor, AttentionContext, Tensor]:
    """A block's attention on its normed input ``x``, scored: (output (B, N, C), scores, context, keys).

    What is computed is ``needs`` (default: ``score.needs``, else the full attention), by ``attend``;
    a block whose input needs autograd, or that is traced or exported, takes the explicit case. Ranking
    logits are float32 for float16/bfloat16 blocks (``ranking_qkv``). ``keys`` (B, H, N, d) in the block's
    dtype, for merging by similarity.
    """
    needs = needs or getattr(score, "needs", FULL)
    site = replace(site, explicit=site.explicit or not may_stream(x), out_dtype=_autocast_dtype(x))
    (q, k, v), precision = ranking_qkv(attn, x, site.float32_projection)
    ops = Operands(q, k, v, attn.scale, bias)
    del q, k, v  # ops holds them: the chunked case may swap them for contiguous copies
    with precision:
        out, ctx, scores = attend(ops, needs, site, score)
    return attn.merge_heads(out), scores, ctx, ops.key

