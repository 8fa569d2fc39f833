"""renyi_entropy against a float64 naive formula, its limits and its properties."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from renyiprune.core.entropy import entropy_from_probs, parse_alpha, renyi_entropy, safe_from_probs

pytestmark = pytest.mark.numerics


def naive(logits: np.ndarray, alpha: float) -> np.ndarray:
    """Textbook definition on float64 probabilities, row by row."""
    out = []
    for row in np.atleast_2d(logits).astype(np.float64):
        finite = np.isfinite(row)
        p = np.zeros_like(row)
        e = np.exp(row[finite] - row[finite].max())
        p[finite] = e / e.sum()
        q = p[p > 0]
        if alpha == 0:
            out.append(math.log(finite.sum()))
        elif alpha == 1:
            out.append(float(-(q * np.log(q)).sum()))
        elif math.isinf(alpha):
            out.append(float(-np.log(q.max())))
        else:
            out.append(float(np.log((q**alpha).sum()) / (1 - alpha)))
    return np.array(out)


rows = st.integers(1, 6).flatmap(
    lambda b: st.integers(2, 40).flatmap(
        lambda n: st.lists(
            st.lists(st.floats(-12, 12, allow_nan=False, width=32), min_size=n, max_size=n),
            min_size=b,
            max_size=b,
        )
    )
)
alphas = st.sampled_from(
    [0.0, 0.3, 0.5, 0.9, 0.99, 1.0, 1.01, 1.2, 1.49, 1.5, 1.51, 2.0, 3.0, 10.0, math.inf]
)


@settings(max_examples=300, deadline=None)
@given(rows, alphas)
def test_matches_float64_naive(x, alpha):
    t = torch.tensor(x, dtype=torch.float32)
    got = renyi_entropy(t, alpha).double().numpy()
    want = naive(np.array(x), alpha)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


@settings(max_examples=300, deadline=None)
@given(
    rows,
    st.sampled_from([1.0, 0.3, 2.0, 3.0, 10.0, math.inf]),
    st.lists(st.booleans(), min_size=40, max_size=40),
)
def test_probabilities_form_matches_float64_naive(x, alpha, mask):
    """``entropy_from_probs`` on float32 softmax probabilities, with masked keys (p = 0 exactly) and logits
    150 below the row maximum (p underflows to 0 in float32), against the float64 textbook value.
    Tolerance as for the logits form: float32 probabilities carry 2^-24 relative error per term."""
    t = torch.tensor(x, dtype=torch.float32)
    n = t.shape[1]
    keep = torch.tensor(mask[:n])
    keep[0] = True  # at least one key in the support
    t = torch.where(keep, t, torch.tensor(-math.inf))
    t[:, -1] = torch.where(keep[-1], t[:, -1] - 150.0, t[:, -1])  # underflows in float32 when kept
    if not safe_from_probs(alpha, n):
        return
    got = entropy_from_probs(t.softmax(dim=-1), alpha).double().numpy()
    want = naive(t.double().numpy(), alpha)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


@settings(max_examples=200, deadline=None)
@given(rows)
def test_non_increasing_in_alpha(x):
    t = torch.tensor(x, dtype=torch.float32)
    grid = [0.0, 0.25, 0.5, 0.75, 0.999, 1.0, 1.001, 1.5, 2.0, 4.0, 16.0, math.inf]
    hs = torch.stack([renyi_entropy(t, a) for a in grid])
    assert (hs[1:] <= hs[:-1] + 1e-5).all()
    assert (hs >= -1e-6).all() and (hs <= math.log(t.shape[-1]) + 1e-5).all()


@pytest.mark.parametrize("eps", [1e-7, 1e-5, 1e-3])
def test_continuous_at_one(eps):
    torch.manual_seed(0)
    x = torch.randn(64, 197) * 4
    h1 = renyi_entropy(x, 1.0)
    for a in (1 - eps, 1 + eps):
        assert torch.allclose(renyi_entropy(x, a), h1, atol=5 * eps + 2e-6)
    # and the float64 naive value at a = 1 +- eps agrees too
    want = naive(x.numpy(), 1 + 1e-3)
    np.testing.assert_allclose(renyi_entropy(x, 1 + 1e-3).numpy(), want, atol=2e-5)


def test_one_hot_and_uniform():
    n = 50
    uniform = torch.zeros(3, n)
    onehot = torch.full((3, n), -1e4)
    onehot[:, 7] = 0
    for a in [0.0, 0.5, 1.0, 2.0, 7.0, math.inf]:
        assert torch.allclose(renyi_entropy(uniform, a), torch.full((3,), math.log(n)), atol=1e-5)
        if a > 0:
            assert torch.allclose(renyi_entropy(onehot, a), torch.zeros(3), atol=1e-5)


def test_masked_keys_are_outside_the_support():
    torch.manual_seed(1)
    x = torch.randn(8, 30)
    masked = torch.cat([x, torch.full((8, 10), -math.inf)], dim=1)
    for a in [0.0, 0.5, 1.0, 1.3, 2.0, 5.0, math.inf]:
        got = renyi_entropy(masked, a)
        assert torch.isfinite(got).all()
        assert torch.allclose(got, renyi_entropy(x, a), atol=1e-6)
    assert torch.allclose(renyi_entropy(masked, 0.0), torch.full((8,), math.log(30)))


def test_dim_argument_and_large_logits():
    torch.manual_seed(2)
    x = torch.randn(4, 5, 6) * 200  # would overflow exp() without log-sum-exp
    for a in [0.5, 1.0, 2.0, math.inf]:
        got = renyi_entropy(x, a, dim=1)
        assert got.shape == (4, 6) and torch.isfinite(got).all()
        want = naive(x.transpose(1, 2).reshape(-1, 5).numpy(), a).reshape(4, 6)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    torch.manual_seed(3)
    x = (torch.randn(16, 197) * 3).to(dtype)
    got = renyi_entropy(x, 2.0)
    assert got.dtype == torch.float32
    want = naive(x.float().numpy(), 2.0)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [-1.0, -1e-9, float("nan"), "two"])
def test_bad_alpha_raises(bad):
    with pytest.raises(ValueError):
        renyi_entropy(torch.zeros(3), bad)


def test_parse_alpha():
    assert parse_alpha("inf") == math.inf and parse_alpha("∞") == math.inf
    assert parse_alpha("2") == 2.0
    with pytest.raises(ValueError):
        parse_alpha("-1")


def test_shannon_temporary_is_at_most_its_share_of_the_probabilities():
    """The cost model counts a Shannon chunk as 1 + SHANNON_TEMP_SHARE buffers: what ``entropy_from_probs``
    allocates beyond p (its temporary and the (rows,) result) must stay within that share, for a p small
    enough that the share (not the 1 MiB cap) binds and for one large enough that the cap does."""
    from renyiprune.core.entropy import SHANNON_TEMP_SHARE
    from renyiprune.experiments.benchmark import PeakTensorMemory

    for shape in ((2, 3, 64, 64), (8, 6, 197, 197)):
        p = torch.softmax(torch.randn(shape, generator=torch.Generator().manual_seed(0)), dim=-1)
        rows = p.numel() // p.shape[-1]
        with torch.inference_mode(), PeakTensorMemory() as mem:
            h = entropy_from_probs(p, 1.0)
        one_row = p.shape[-1] * 4  # the share is rounded up to whole rows
        assert mem.peak <= SHANNON_TEMP_SHARE * p.nbytes + one_row + rows * 4
        assert mem.peak <= (1 << 20) + one_row + rows * 4
        want = -(p.double() * p.double().log()).sum(-1)
        torch.testing.assert_close(h.double(), want, atol=2e-6, rtol=0)  # float32 sums of <= 197 terms
