"""A pruning block's attention without the (B, H, N, N) matrix: only what the criterion declared.

``attend(q, k, v, scale, needs)`` returns the attention output and a context holding what ``needs``
(``context.Needs``) asks for:
- only the CLS row, keys or values: fused SDPA for the output, plus the CLS query's row (q_cls . K^T);
- row entropies or column statistics: the queries in chunks (of images, then of query rows); each
  chunk's logits (b, H, c, N) with the key bias, softmax, per-row Rényi entropies, output rows and the
  column accumulators, then the next chunk. Chunk size comes from a memory budget in bytes;
- ``Needs(full=True)``: the explicit attention, as ``context.AttentionContext`` always did.
float16/bfloat16 inputs: each image block's keys and values, and each chunk, are upcast to float32, so
rankings use float32 logits and no float32 copy of anything the size of the batch exists. For inference
(no autograd through the chunks; a block that trains uses the explicit path).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import AttentionContext, Needs, attention_logits
from .entropy import renyi_entropy

__all__ = ["attend", "StreamedContext", "chunk_plan", "DEFAULT_CHUNK_BYTES"]

# Bytes of the two chunk buffers (logits and probabilities) per step, at most: 4 MiB keeps a chunk in the
# caches of current CPUs (fastest on this project's machine among 1-16 MiB); smaller batches get at most
# half of one float32 (B, N, C) activation, so the chunks never raise a block's peak memory noticeably.
DEFAULT_CHUNK_BYTES = 4 * 2**20
_BUFFERS = 2


class StreamedContext(AttentionContext):
    """An attention context filled by ``attend`` with what the criterion declared, and nothing else.

    Reading something that was not declared (the full ``logits``/``probs``, an undeclared Rényi order,
    ...) raises a ValueError that names the ``Needs`` field to declare.
    """

    def __init__(
        self,
        needs: Needs,
        *,
        batch_size: int,
        device: torch.device,
        num_patches: int,
        num_prefix: int = 1,
        stage: int = 0,
        step: int = 0,
        key: Tensor | None = None,
        value: Tensor | None = None,
        entropy: dict[float, Tensor] | None = None,
        cls_rows: Tensor | None = None,
        received: Tensor | None = None,
        column_norms: dict[float, Tensor] | None = None,
        mean_attention: Tensor | None = None,
    ):
        self.needs = needs
        self._batch_size = batch_size
        self._device = device
        self.num_patches = num_patches
        self.num_prefix = num_prefix
        self.stage = stage
        self.step = step
        self._key = key
        self._value = value
        self._entropy = dict(entropy or {})  # full rows (B, H, N); patches sliced on reading
        self._cls_rows = cls_rows
        self._received = received
        self._column_norms = dict(column_norms or {})
        self._mean_attention = mean_attention

    def __repr__(self) -> str:
        return f"StreamedContext({self.needs}, num_patches={self.num_patches}, stage={self.stage})"

    def _missing(self, what: str, field: str) -> ValueError:
        return ValueError(f"this criterion read {what}, which it did not declare: add {field} to its needs "
                          f"(register_criterion(..., needs=Needs({field}))); declared: {self.needs}")

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def logits(self) -> Tensor:
        raise self._missing("the full attention logits", "full=True")

    @property
    def probs(self) -> Tensor:
        raise self._missing("the full attention probabilities", "full=True")

    @property
    def cls_rows(self) -> Tensor:
        if self._cls_rows is None:
            raise self._missing("the CLS row", "cls_row=True")
        return self._cls_rows

    @property
    def received(self) -> Tensor:
        if self._received is None:
            raise self._missing("the attention received per head", "received=True")
        return self._received

    @property
    def mean_attention(self) -> Tensor:
        if self._mean_attention is None:
            raise self._missing("the head-mean attention", "mean_attention=True")
        return self._mean_attention

    def column_norm(self, n: float) -> Tensor:
        if float(n) not in self._column_norms:
            raise self._missing(f"the l_{n:g} column norm", f"column_norm=({n:g},)")
        return self._column_norms[float(n)]

    @property
    def key(self) -> Tensor:
        if self._key is None or not (self.needs.key or self.needs.full):
            raise self._missing("the keys", "key=True")
        return self._key

    @property
    def value(self) -> Tensor:
        if self._value is None or not (self.needs.value or self.needs.full):
            raise self._missing("the values", "value=True")
        return self._value

    def row_entropy(self, alpha: float) -> Tensor:
        a = float(alpha)
        if a not in self._entropy:
            raise self._missing(f"the order-{a:g} row entropy", f"row_entropy=({a:g},)")
        return self.patches(self._entropy[a], dim=2)


def chunk_plan(
    batch: int, heads: int, n: int, element_size: int, budget: int | None = None
) -> tuple[int, int]:
    """(images, query rows) per chunk so that the chunk buffers fit ``budget`` bytes (at least one row).

    Whole images when one fits (several per chunk if the budget allows), else rows of one image.
    """
    budget = DEFAULT_CHUNK_BYTES if budget is None else int(budget)
    if budget < 1:
        raise ValueError(f"chunk budget must be a positive number of bytes, got {budget}")
    rows = max(1, budget // (_BUFFERS * heads * n * element_size))
    if rows >= n:
        return max(1, min(batch, rows // n)), n
    return 1, rows


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _fast_order(a: float, n: int) -> bool:
    """Orders computed from the chunk's probabilities (as ``context._row_entropy_from_probs``): 1, inf,
    and |a - 1| >= 0.5 where p^a cannot underflow; elsewhere the log-sum-exp form of ``renyi_entropy``."""
    return a == 1.0 or math.isinf(a) or (a != 0.0 and abs(a - 1.0) >= 0.5 and a * math.log(n) <= 60.0)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    needs: Needs,
    *,
    bias: Tensor | None = None,
    num_patches: int | None = None,
    num_prefix: int = 1,
    stage: int = 0,
    step: int = 0,
    chunk_bytes: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, AttentionContext]:
    """Attention output (B, H, N, d) of softmax(scale q k^T + bias) v, and the criterion's context.

    q, k, v: (B, H, N, d); ``bias`` (B, 1, 1, N) is added to every row's logits (proportional attention,
    log token sizes; -inf masks a key). The output has ``out_dtype`` (default: v's). ``num_patches``
    defaults to the tokens after the ``num_prefix`` prefix tokens. ``chunk_bytes``: memory budget of the
    chunk buffers (default: ``DEFAULT_CHUNK_BYTES``, at most half of one float32 (B, N, H * d) tensor).
    """
    B, H, N, d = q.shape
    out_dtype = out_dtype or v.dtype
    if chunk_bytes is None:
        chunk_bytes = max(1, min(DEFAULT_CHUNK_BYTES, B * N * H * d * 2))
    n = N - num_prefix if num_patches is None else num_patches
    kw = dict(num_patches=n, num_prefix=num_prefix, stage=stage, step=step)
    if needs.full:
        out, ctx = _explicit(q, k, v, scale, bias, kw)
        return out.to(out_dtype), ctx
    if not needs.per_query:
        mask = None if bias is None else bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).to(out_dtype)
        cls = _cls_rows(q, k, scale, bias, chunk_bytes) if needs.cls_row else None
        ctx = StreamedContext(needs, batch_size=B, device=q.device, key=k, value=v, cls_rows=cls, **kw)
        return out, ctx
    return _streamed(q, k, v, scale, needs, bias, chunk_bytes, out_dtype, kw)


def _explicit(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor | None, kw: dict):
    """The explicit path: one (B, H, N, N) logits tensor, as the criteria always had it."""
    acc = _acc_dtype(q)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    logits = attention_logits(qf, kf, scale)
    if bias is None:
        ctx = AttentionContext(logits, **kw, query=qf, key=kf, value=vf, scale=scale, reuse_logits=True)
    else:
        ctx = AttentionContext(logits.add_(bias.to(acc)), **kw, key=kf, value=vf)
    return (ctx.probs @ vf).to(v.dtype), ctx


def _cls_rows(q: Tensor, k: Tensor, scale: float, bias: Tensor | None, chunk_bytes: int | None) -> Tensor:
    """softmax(scale q_cls k^T + bias) per head (B, H, N), upcasting the keys one image block at a time."""
    B, H, N, _ = q.shape
    acc = _acc_dtype(q)
    images = max(1, chunk_plan(B, H, N, torch.finfo(acc).bits // 8, chunk_bytes)[0])
    rows = []
    for b0 in range(0, B, images):
        bs = slice(b0, min(B, b0 + images))
        s = torch.matmul(q[bs, :, :1].to(acc), k[bs].to(acc).transpose(-2, -1)).mul_(scale)
        if bias is not None:
            s.add_(bias[bs].to(acc))
        rows.append(s.softmax(dim=-1).squeeze(2))
    return torch.cat(rows) if len(rows) > 1 else rows[0]


class _Accumulators:
    """Per-call outputs of the streamed pass, filled chunk by chunk."""

    def __init__(self, needs: Needs, B: int, H: int, N: int, acc: torch.dtype, device: torch.device):
        new = dict(dtype=acc, device=device)
        self.entropy = {a: torch.empty(B, H, N, **new) for a in needs.row_entropy}
        self.cls = torch.empty(B, H, N, **new) if needs.cls_row else None
        self.received = torch.zeros(B, H, N, **new) if needs.received else None
        self.mean_attention = torch.empty(B, N, N, **new) if needs.mean_attention else None
        # l_n column norms, online: running column maximum m and sum of (p / m)^n
        self.peak = {nn: torch.zeros(B, N, **new) for nn in needs.column_norm}
        self.power = {nn: torch.zeros(B, N, **new) for nn in needs.column_norm if not math.isinf(nn)}

    def column_norms(self) -> dict[float, Tensor]:
        out = {}
        for nn, peak in self.peak.items():
            if math.isinf(nn):
                out[nn] = peak
            else:
                out[nn] = peak.clamp_min(torch.finfo(peak.dtype).tiny) * self.power[nn].pow(1.0 / nn)
        return out

    def add_columns(self, bs: slice, p_mean: Tensor) -> None:
        """Fold a chunk's head-mean probabilities (b, c, N) into the online l_n sums of images ``bs``."""
        tiny = torch.finfo(p_mean.dtype).tiny
        for nn, peak in self.peak.items():
            new_peak = torch.maximum(peak[bs], p_mean.amax(dim=1))
            if not math.isinf(nn):
                floor = new_peak.clamp_min(tiny)
                rescale = (peak[bs] / floor).pow_(nn)  # earlier chunks' terms, relative to the new peak
                terms = (p_mean / floor.unsqueeze(1)).pow_(nn).sum(1)
                self.power[nn][bs] = self.power[nn][bs] * rescale + terms
            peak[bs] = new_peak


def _streamed(q, k, v, scale, needs: Needs, bias, chunk_bytes, out_dtype, kw):
    """Queries in chunks: logits, softmax, entropies, output rows and column statistics per chunk."""
    B, H, N, d = q.shape
    acc = _acc_dtype(q)
    images, rows = chunk_plan(B, H, N, torch.finfo(acc).bits // 8, chunk_bytes)
    out = v.new_empty(B, N, H, d, dtype=out_dtype)  # merge_heads reads (B, H, N, d): a free view of this
    res = _Accumulators(needs, B, H, N, acc, q.device)
    fast = [a for a in needs.row_entropy if _fast_order(a, N)]
    slow = [a for a in needs.row_entropy if not _fast_order(a, N)]
    masked = bias is not None and bool(torch.isneginf(bias).any())
    exact_fold = math.frexp(scale)[0] == 0.5  # a power of two: scaling q first gives the same logits
    need_mean = bool(needs.column_norm) or needs.mean_attention
    flat_s = torch.empty(images * H * rows * N, dtype=acc, device=q.device)
    flat_p = torch.empty_like(flat_s)
    for b0 in range(0, B, images):
        bs = slice(b0, min(B, b0 + images))
        b = bs.stop - b0
        kb = k[bs].to(acc).reshape(b * H, N, d)  # contiguous per image block (a copy when strided)
        vb = v[bs].to(acc).reshape(b * H, N, d)
        bias_b = None if bias is None else bias[bs].to(acc).expand(b, H, 1, N).reshape(b * H, 1, N)
        for i0 in range(0, N, rows):
            rs = slice(i0, min(N, i0 + rows))
            c = rs.stop - i0
            s = flat_s[: b * H * c * N].view(b * H, c, N)
            p = flat_p[: b * H * c * N].view(b * H, c, N)
            qc = q[bs, :, rs].to(acc)
            if exact_fold:
                torch.bmm((qc * scale).reshape(b * H, c, d), kb.transpose(1, 2), out=s)
            else:
                torch.bmm(qc.reshape(b * H, c, d), kb.transpose(1, 2), out=s).mul_(scale)
            if bias_b is not None:
                s.add_(bias_b)
            for a in slow:
                res.entropy[a][bs, :, rs] = renyi_entropy(s, a).view(b, H, c)
            torch.softmax(s, dim=-1, out=p)
            for a in fast:
                res.entropy[a][bs, :, rs] = _entropy_from_probs(s, p, a, masked).view(b, H, c)
            out[bs, rs] = torch.bmm(p, vb).view(b, H, c, d).transpose(1, 2)
            p4 = p.view(b, H, c, N)
            if res.received is not None:
                res.received[bs] += p4.sum(dim=2)
            if res.cls is not None and i0 == 0:
                res.cls[bs] = p4[:, :, 0]
            if need_mean:
                p_mean = p4.mean(dim=1)  # (b, c, N)
                if res.mean_attention is not None:
                    res.mean_attention[bs, rs] = p_mean
                res.add_columns(bs, p_mean)
    if res.received is not None:
        res.received /= N
    ctx = StreamedContext(
        needs, batch_size=B, device=q.device, key=k, value=v, entropy=res.entropy, cls_rows=res.cls,
        received=res.received, column_norms=res.column_norms(), mean_attention=res.mean_attention, **kw,
    )  # fmt: skip
    return out.transpose(1, 2), ctx


def _entropy_from_probs(s: Tensor, p: Tensor, a: float, masked: bool) -> Tensor:
    """H_a of every row of a chunk from its logits s and probabilities p = softmax(s), no temporaries
    the size of the chunk (the fast path of ``context``):
      H_inf = -log max p;   H_1 = L - sum_j p_j s_j with L = max s - log max p (L = s_j - log p_j for
      every j; j = argmax);   H_a = a / (1 - a) log ||p||_a.
    """
    if math.isinf(a):
        return p.amax(dim=-1).log_().neg_()
    if a != 1.0:
        return torch.linalg.vector_norm(p, ord=a, dim=-1).log_().mul_(a / (1.0 - a))
    if masked:
        s.clamp_min_(torch.finfo(s.dtype).min)  # -inf keys: p = 0 and p * s = 0, not NaN
    lse = s.amax(dim=-1) - p.amax(dim=-1).log_()
    return lse.sub_(torch.linalg.vecdot(p, s))
