"""Tolerance policy for numerical tests: how close two computations of the same thing must be.

Tests import the names below instead of writing literal atol/rtol wherever two computations go through
different kernels (a pruning block's explicit attention against fused SDPA, Hugging Face's attention
against ours, inductor, onnxruntime, other batch sizes). Equality (``torch.equal``) stays where the two
sides run the same kernels on the same inputs: rounding is deterministic on one machine, so any
difference there is a bug.

Why comparisons are normwise. A float32 forward has an absolute error of a few units of roundoff times the
*scale* of its output, not times each element: a logit near zero carries the same absolute error as a
large one. On DeiT-Tiny, keep-rate-1.0 pruning against SDPA differs by 8e-7 of max|logit| but by up to
1.4 % of some near-zero logits, so an elementwise relative tolerance fails on one element or another
depending on the CPU. ``assert_close_normwise`` checks |got - want| <= rtol * max|want| everywhere.

The rounding model behind ``vit_rtol`` (u = unit roundoff: 2**-24 in float32, 2**-53 in float64).

* One n-term reduction (dot product, LayerNorm mean/variance, softmax sum) rounded in any order has a
  relative error below sqrt(n) * u with high probability (Higham & Mary, "A new approach to
  probabilistic rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019); the worst case n * u is
  reached only by correlated roundings, which different summation orders do not produce.
* One pre-norm ViT block of width C, head dimension D, N tokens has on its dependency chain: two
  LayerNorms (one pass of moments over C each), the qkv, proj and fc1 products (C each), fc2 (4C, i.e.
  2 sqrt(C)), the attention logits (D), the softmax normalisation and probabilities @ values (N each):
  e_block = 7 sqrt(C) + sqrt(D) + 2 sqrt(N) units of u, relative to the residual stream. The branch
  output is in fact a fraction (0.08-0.28 on DeiT-Tiny) of the stream it is added to; counting it as
  the whole stream leaves room. The attention logits' magnitude (up to 32 on DeiT-Tiny) does not add a
  term: softmax is unchanged by a common shift and large logits make the attention concentrated, so
  logit errors reach the output weighted by (p_j - mean p); measured branch errors are 7.6-31 u in
  every block whatever its largest logit.
* The residual stream carries each block's error to the output unamplified (x + f(norm(x))), so the
  errors of L blocks add: L * e_block.
* Two computations through different kernels each have that error; once they diverge, every later
  operation rounds independently on each side, so the whole forward counts, twice:
  rtol = 2 * L * e_block * u.

Measured on an AMD EPYC (AVX-512) under ATEN_CPU_CAPABILITY=default, avx2 and avx512, normwise:
DeiT-Tiny, explicit attention in all 12 blocks against SDPA: 11.9-13.5 u; each against a float64 forward:
26-31 u (the per-block contributions, 1.5-7.3 u, add up to it: errors accumulate linearly over blocks).
Every comparison in the suite that uses this policy: at most 18 u (float32 and float64), against
tolerances of 234 u (3-block model) to 3194 u (DeiT-Tiny): a margin of 25 or more for other CPUs.

What a float32 tolerance can and cannot see, on DeiT-Tiny's logits (8 ImageNet images; F32_DEIT_TINY =
1.9e-4): dropping one of 196 tokens at block 3 moves them by 4.1e-3 of their scale (22 x the tolerance),
at block 9 by 8.3e-4 (4.3 x); GELU's tanh approximation in one block by 2.3e-4 (1.2 x); LayerNorm eps
1e-5 instead of 1e-6 by 4.4e-5 (0.23 x: invisible). Formula details of that size belong in float64 comparisons
(the naive per-image references here are float64), whose tolerances (3e-14 to 1e-13) leave no room.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "U32",
    "U64",
    "unit_roundoff",
    "vit_rtol",
    "assert_close_normwise",
    "DEIT_TINY",
    "F32_DEIT_TINY",
    "F64_DEIT_TINY",
]

#: float32 unit roundoff: one round-to-nearest to a 24-bit significand errs by at most 2**-24 ~ 6.0e-8.
U32 = 2.0**-24
#: float64 unit roundoff (53-bit significand), ~ 1.1e-16.
U64 = 2.0**-53


def unit_roundoff(dtype: torch.dtype) -> float:
    """u of a floating dtype: half the distance from 1 to the next number (``finfo.eps / 2``)."""
    return torch.finfo(dtype).eps / 2


def vit_rtol(dtype: torch.dtype, *, depth: int, dim: int, heads: int, tokens: int) -> float:
    """Normwise relative tolerance between two computations of the same ViT forward (``depth`` blocks
    of width ``dim``, ``heads`` heads, ``tokens`` tokens with CLS) through different kernels, in
    ``dtype``: 2 * depth * (7 sqrt(dim) + sqrt(dim / heads) + 2 sqrt(tokens)) * u (module docstring)."""
    per_block = 7 * math.sqrt(dim) + math.sqrt(dim / heads) + 2 * math.sqrt(tokens)
    return 2 * depth * per_block * unit_roundoff(dtype)


def assert_close_normwise(got: torch.Tensor, want: torch.Tensor, rtol: float, msg: str | None = None) -> None:
    """Same shape and dtype, and |got - want| <= rtol * max|want| in every element."""
    scale = want.detach().abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=0.0, atol=rtol * scale, msg=msg)


#: DeiT-Tiny at 224 px (what the shared-assets tests load): 12 blocks, width 192, 3 heads, 197 tokens.
DEIT_TINY = dict(depth=12, dim=192, heads=3, tokens=197)
#: 3194 u ~ 1.9e-4 of max|output|; measured cross-kernel differences are 12-14 u.
F32_DEIT_TINY = vit_rtol(torch.float32, **DEIT_TINY)
#: The same count in float64 ~ 3.5e-13.
F64_DEIT_TINY = vit_rtol(torch.float64, **DEIT_TINY)
