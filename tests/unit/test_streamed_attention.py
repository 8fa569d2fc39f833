"""Streamed pruning attention (``streamed.attend``) against the explicit computation, and criteria needs."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from renyiprune.core.attention import FULL, Needs, Operands, Site, Statistics
from renyiprune.core.criteria import CRITERIA, make_criterion, needs_of
from renyiprune.core.entropy import renyi_entropy
from renyiprune.core.streamed import CACHE_BYTES, StreamedContext, attend, chunk_plan, memory_budget
from renyiprune.experiments.benchmark import PeakTensorMemory

ALPHAS = (0.0, 0.5, 0.7, 1.0, 2.0, 3.0, math.inf)
EVERYTHING = Needs(row_entropy=ALPHAS, cls_row=True, received=True, column_norm=(1.0, 4.0, math.inf),
                   mean_attention=True, key=True, value=True)  # fmt: skip


def qkv(B, H, N, d, dtype=torch.float64, seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    return (spread * torch.randn(3, B, H, N, d, generator=g, dtype=torch.float64)).to(dtype).unbind(0)


def run(q, k, v, scale, needs, bias=None, chunk_bytes=None, num_prefix=1):
    """``attend`` on these operands: (output, context)."""
    site = Site(num_prefix=num_prefix, chunk_bytes=chunk_bytes)
    out, ctx, _ = attend(Operands(q, k, v, scale, bias), needs, site)
    return out, ctx


def reference(q, k, v, scale, bias=None):
    """Everything from the one explicit (B, H, N, N) attention, in float64 by the plain formulas."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()
    p = s.softmax(-1)
    mean = p.mean(dim=1)
    return dict(
        out=p @ v,
        entropy={a: renyi_entropy(s, a) for a in ALPHAS},  # log-sum-exp form, not the chunk fast path
        cls=p[:, :, 0],
        received=p.mean(dim=2),
        mean_attention=mean,
        column_norm={n: mean.amax(1) if math.isinf(n) else mean.pow(n).sum(1).pow(1 / n)
                     for n in (1.0, 4.0, math.inf)},
    )  # fmt: skip


def check(q, k, v, scale, bias, chunk, atol, out_atol=None, needs=EVERYTHING, num_prefix=1):
    ref = reference(q, k, v, scale, bias)
    out, ctx = run(q, k, v, scale, needs, bias, chunk, num_prefix)
    assert isinstance(ctx, StreamedContext) and out.dtype == v.dtype and out.shape == v.shape
    torch.testing.assert_close(out.double(), ref["out"], atol=out_atol or atol, rtol=0)
    for a in needs.row_entropy:
        want = ref["entropy"][a][:, :, num_prefix:]
        torch.testing.assert_close(ctx.row_entropy(a).double(), want, atol=atol, rtol=0)
    if needs.cls_row:
        torch.testing.assert_close(ctx.cls_rows.double(), ref["cls"], atol=atol, rtol=0)
        torch.testing.assert_close(ctx.cls_attn.double(), ref["cls"].mean(1), atol=atol, rtol=0)
    if needs.received:
        torch.testing.assert_close(ctx.received.double(), ref["received"], atol=atol, rtol=0)
    if needs.mean_attention:
        torch.testing.assert_close(ctx.mean_attention.double(), ref["mean_attention"], atol=atol, rtol=0)
    for n in needs.column_norm:
        torch.testing.assert_close(ctx.column_norm(n).double(), ref["column_norm"][n], atol=atol, rtol=0)
    return ctx


# Float64: every quantity is a sum of at most N <= 64 terms of size <= log N ~ 4 (entropies) or <= 1
# (probabilities); rounding is then below N * 4 * 2.2e-16 ~ 6e-14 per step, so 1e-12 leaves room for a
# few steps and still fails on any real difference (a wrong row, key or chunk boundary moves values by
# far more than that).
F64 = 1e-12


@pytest.mark.parametrize("chunk", [1, 3000, 40_000, None])  # one row, rows of an image, images, cost model
@pytest.mark.parametrize("bias", ["none", "sizes", "masked"])
def test_float64_equals_explicit(chunk, bias):
    B, H, N, d = 3, 2, 37, 8  # N prime: no chunk size divides it
    q, k, v = qkv(B, H, N, d, seed=1)
    b = None
    if bias != "none":
        g = torch.Generator().manual_seed(2)
        b = torch.rand(B, 1, 1, N, generator=g, dtype=torch.float64).mul(3).add(1).log()  # log token sizes
        if bias == "masked":
            b[0, ..., [3, 10, 36]] = -math.inf
            b[2, ..., 0] = -math.inf
    check(q, k, v, 0.3, b, chunk, F64)


def test_float32_against_float64():
    """float32 inputs: the chunk math in float32 against the float64 reference.

    Logits here are O(10) (|q.k| * scale with spread 2); float32 rounds each to ~1e-6 absolute, softmax
    and the entropy sums over 197 keys add a few such errors, so entropies agree to ~1e-5 and
    probabilities (<= 1) to ~1e-6; 1e-4 / 2e-5 are a factor ~10 above what this platform shows, for other
    CPUs' summation orders (AVX2 vs AVX-512), and far below any real mistake (entropy gaps between
    rows are ~1e-2 here).
    """
    B, H, N, d = 2, 3, 197, 16
    q, k, v = qkv(B, H, N, d, dtype=torch.float32, seed=3)
    bias = torch.rand(B, 1, 1, N).mul(2).add(1).log()
    for chunk in (5000, None):
        ctx = check(q, k, v, 0.25, bias, chunk, atol=1e-4, out_atol=2e-5)
        assert ctx.row_entropy(1.0).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_chunks_in_float32_without_full_copies(dtype, request):
    """Half-precision q, k, v: statistics in float32, equal to the float32 computation on the same
    (upcast) values up to float32 summation order (1e-5, as above); the output, by the half-precision
    SDPA, is rounded to the input dtype (bf16 keeps 8 bits: |out| <= ~4 here, so 4 * 2^-8 = 0.016).
    Peak memory stays far below one float32 (B, H, N, N) tensor."""
    if dtype == torch.bfloat16:
        request.getfixturevalue("bf16_attention")  # skips where torch cannot run bfloat16 attention
    B, H, N, d = 4, 2, 96, 8
    q, k, v = qkv(B, H, N, d, dtype=dtype, seed=4, spread=1.0)
    full32 = B * H * N * N * 4
    needs = Needs(row_entropy=(1.0, 2.0, math.inf), cls_row=True, received=True)
    with torch.inference_mode(), PeakTensorMemory() as mem:
        out, ctx = run(q, k, v, 0.35, needs, chunk_bytes=full32 // 16)
    assert mem.peak < full32 / 2
    assert out.dtype == dtype and ctx.row_entropy(2.0).dtype == torch.float32
    _, want = run(q.float(), k.float(), v.float(), 0.35, needs, chunk_bytes=full32 // 16)
    for a in needs.row_entropy:
        torch.testing.assert_close(ctx.row_entropy(a), want.row_entropy(a), atol=1e-5, rtol=0)
    torch.testing.assert_close(ctx.received, want.received, atol=1e-6, rtol=0)
    ref = reference(q, k, v, 0.35)
    out_tol = 0.02 if dtype == torch.bfloat16 else 3e-3  # float16 keeps 11 bits: 4 * 2^-11 = 2e-3
    torch.testing.assert_close(out.double(), ref["out"], atol=out_tol, rtol=0)


def test_never_a_full_attention_tensor():
    """Float32 at a small budget: everything allocated at once stays below one image's (H, N, N)
    attention, a quarter of the batch's (the explicit path needs at least the whole batch's)."""
    B, H, N, d = 4, 3, 96, 4
    q, k, v = qkv(B, H, N, d, dtype=torch.float32, seed=5)
    full = B * H * N * N * 4
    for needs in (Needs(row_entropy=(1.0,)), Needs(received=True, cls_row=True), Needs(column_norm=(4.0,))):
        with torch.inference_mode(), PeakTensorMemory() as mem:
            run(q, k, v, 0.3, needs, chunk_bytes=full // 12)
        assert mem.peak < full / 4, needs
    with torch.inference_mode(), PeakTensorMemory() as mem:
        run(q, k, v, 0.3, FULL)
    assert mem.peak >= full  # the same tracker does see the explicit path's (B, H, N, N) tensor


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 3),
    H=st.integers(1, 3),
    N=st.integers(2, 40),
    d=st.integers(1, 6),
    prefix=st.integers(1, 2),
    chunk=st.integers(1, 30_000),
    mask=st.lists(st.booleans(), min_size=40, max_size=40),
    alpha=st.sampled_from(ALPHAS),
    seed=st.integers(0, 2**16),
)
def test_property_any_shape_and_chunk(B, H, N, d, prefix, chunk, mask, alpha, seed):
    """Any shape (N = 2 up: CLS plus one patch), any chunk budget (one row at a time up to whole
    images, chunks that do not divide N), masked keys (one key always left): float64 equality."""
    prefix = min(prefix, N - 1)
    q, k, v = qkv(B, H, N, d, seed=seed)
    bias = torch.zeros(B, 1, 1, N, dtype=torch.float64)
    bias[..., torch.tensor(mask[:N])] = -math.inf
    bias[..., seed % N] = 0.0
    needs = Needs(row_entropy=(alpha,), cls_row=True, received=True, column_norm=(4.0,), mean_attention=True)
    check(q, k, v, 0.5, bias, chunk, F64, needs=needs, num_prefix=prefix)


def test_cls_only_path_uses_sdpa_and_one_row():
    """Needs without per-query work: fused SDPA output and the CLS row only; no entropies stored."""
    B, H, N, d = 2, 3, 30, 8
    q, k, v = qkv(B, H, N, d, seed=6)
    bias = torch.rand(B, 1, 1, N, dtype=torch.float64).add(1).log()
    ctx = check(q, k, v, 0.4, bias, None, F64, needs=Needs(cls_row=True, value=True))
    assert ctx.value is v
    with pytest.raises(ValueError, match="row_entropy"):
        ctx.row_entropy(1.0)
    with pytest.raises(ValueError, match="full=True"):
        _ = ctx.probs
    with pytest.raises(ValueError, match="key=True"):
        _ = ctx.key


def test_chunk_plan():
    for B, H, N, budget in [(64, 6, 197, 4 << 20), (64, 6, 577, 4 << 20), (2, 1, 5, 1), (3, 2, 10, 10**9)]:
        for cache in (None, 1, 1 << 20, 8 << 20):
            images, rows = chunk_plan(B, H, N, 4, budget, cache_bytes=cache)
            assert 1 <= images <= B and 1 <= rows <= N
            assert rows == 1 or images * H * rows * N * 4 <= budget
            assert images == 1 or rows == N
            assert images == 1 or cache is None or images * H * N * N * 4 <= cache
    assert chunk_plan(3, 2, 10, 4, 10**9) == (3, 10)
    assert chunk_plan(3, 2, 10, 4, 10**9, cache_bytes=2 * 2 * 10 * 10 * 4) == (2, 10)
    assert chunk_plan(64, 6, 577, 8, 4 << 20) == (1, 151)  # 4 MiB / (6 heads * 577 keys * 8 B)
    # the cache cap never splits an image into rows: only the memory budget does
    assert chunk_plan(2, 6, 577, 4, 10**9, cache_bytes=1) == (1, 577)
    with pytest.raises(ValueError, match="positive"):
        chunk_plan(1, 1, 4, 4, 0)


def test_cost_model_at_224_and_384():
    """The cost model for DeiT-S (6 heads, C = 384) in float32. Memory (4 B N C activations for the
    buffer) allows the whole batch at 224 px (N = 197: one image's 6 x 197^2 logits < 4 x 197 x 384) and
    query rows of one image at 384 px (N = 577: 6 x 577^2 > 4 x 577 x 384, so 4 x 384 / 6 = 256 rows
    fit). The cache cap then takes 8 MiB // (6 x 197^2 x 4 B) = 9 images per chunk at 224 px, and one
    image (6 x 577^2 x 4 B = 7.99 MB) at 384 px where memory would allow 7 or 28."""
    for B, images in ((1, 1), (16, 9), (64, 9)):
        assert chunk_plan(B, 6, 197, 4, memory_budget(B, 197, 384, 4), CACHE_BYTES) == (images, 197)
        assert chunk_plan(B, 6, 197, 4, memory_budget(B, 197, 384, 4)) == (B, 197)
    assert chunk_plan(1, 6, 577, 4, memory_budget(1, 577, 384, 4), CACHE_BYTES) == (1, 256)
    for B, memory_only in ((16, 7), (64, 28)):  # 16 * 256 rows: 7 images
        assert chunk_plan(B, 6, 577, 4, memory_budget(B, 577, 384, 4)) == (memory_only, 577)
        assert chunk_plan(B, 6, 577, 4, memory_budget(B, 577, 384, 4), CACHE_BYTES) == (1, 577)
    # bfloat16 activations: half the budget, float32 buffers; log-sum-exp orders: three buffers
    assert chunk_plan(1, 6, 197, 4, memory_budget(1, 197, 384, 2), CACHE_BYTES) == (1, 128)
    assert chunk_plan(1, 6, 197, 12, memory_budget(1, 197, 384, 4), CACHE_BYTES) == (1, 85)
    # Shannon: the chunk plus a temporary of an eighth of it, 8 MiB // (1.125 x 6 x 197^2 x 4 B) = 8 images
    shannon = Statistics(Needs(row_entropy=(1.0,)), (16, 6, 197), torch.empty(0)).chunk_buffers()
    assert shannon == 1.125
    assert chunk_plan(16, 6, 197, 4 * shannon, memory_budget(16, 197, 384, 4), CACHE_BYTES) == (8, 197)


def test_every_criterion_scores_equal_explicit_float64():
    """Each registered criterion on its declared needs gives the scores (and so the kept sets) of the
    explicit context, in float64, with and without a key bias."""
    B, H, N, d = 2, 3, 26, 8
    q, k, v = qkv(B, H, N, d, seed=7)
    bias = torch.rand(B, 1, 1, N, dtype=torch.float64).add(1).log()
    options = [(name, {}) for name in CRITERIA] + [
        ("renyi", {"alpha": a}) for a in (0.5, 2.0, math.inf)] + [
        ("column_norm", {"norm": math.inf}), ("hybrid", {"base": "headvar"}),
        ("diverse", {"base": "pagerank"}), ("renyi", {"direction": "column"})]  # fmt: skip
    for name, opts in options:
        fn = make_criterion(name, **opts)
        for b in (None, bias):
            _, ctx = run(q, k, v, 0.3, fn.needs, bias=b, chunk_bytes=2000)
            _, explicit = run(q, k, v, 0.3, FULL, bias=b)
            got, want = fn(ctx), fn(explicit)
            torch.testing.assert_close(got, want, atol=F64, rtol=0, msg=f"{name} {opts}")
            kept = lambda s: s.topk(12, dim=1).indices.sort(dim=1).values  # noqa: E731
            assert torch.equal(kept(got), kept(want)), (name, opts)


def test_needs_declarations():
    assert needs_of("renyi", alpha=2.0) == Needs(row_entropy=(2.0,))
    assert needs_of("renyi", direction="column") == FULL and needs_of("renyi", cls_key="exclude") == FULL
    assert needs_of("shannon") == Needs(row_entropy=(1.0,))
    assert needs_of("evit") == Needs(cls_row=True)
    assert needs_of("hybrid", alpha=math.inf) == Needs(row_entropy=(math.inf,), cls_row=True)
    assert needs_of("diverse") == Needs(cls_row=True, key=True)
    assert needs_of("column_norm", norm=2) == Needs(column_norm=(2.0,))
    assert make_criterion("pagerank").needs == Needs(mean_attention=True)
    assert not FULL.per_query and Needs(received=True).per_query
    assert (Needs(row_entropy=(2.0,)) | Needs(row_entropy=(1.0, 2.0), key=True)) == Needs(
        row_entropy=(1.0, 2.0), key=True)  # fmt: skip


def test_undeclared_reads_fail_at_the_first_forward_naming_the_field():
    """make_criterion runs no forward pass; a criterion that reads more than it declared fails at its
    first scoring, naming what to declare; an undeclared custom criterion gets the full attention."""

    def sneaky(ctx):
        return ctx.patches(ctx.probs[:, :, 0].mean(1))

    sneaky.needs = Needs(cls_row=True)
    fn = make_criterion(sneaky)
    q, k, v = qkv(1, 2, 9, 4, seed=8)
    with pytest.raises(ValueError, match="full=True"):
        attend(Operands(q, k, v, 0.5), fn.needs, Site(), fn)

    def undeclared(ctx):
        return ctx.patches(ctx.probs[:, :, 0].mean(1))

    fn = make_criterion(undeclared)
    assert fn.needs == FULL
    _, ctx, scores = attend(Operands(q, k, v, 0.5), fn.needs, Site(), fn)
    torch.testing.assert_close(scores, reference(q, k, v, 0.5)["cls"].mean(1)[:, 1:])
    torch.testing.assert_close(fn(ctx), scores)


def test_undeclared_statistic_reads_fail_naming_the_field():
    """A criterion that declared one statistic and reads another (another Rényi order, the attention
    received, a column norm, the keys, a registered statistic) fails with a ValueError naming the
    ``Needs`` field to add, on every streamed case (CLS row only: SDPA; row entropies: chunks)."""
    q, k, v = qkv(2, 2, 9, 4, seed=11)
    reads = {
        "row_entropy": lambda ctx: ctx.row_entropy(3.0),
        "received": lambda ctx: ctx.received,
        "column_norm": lambda ctx: ctx.column_norm(2.0),
        "mean_attention": lambda ctx: ctx.mean_attention,
        "key=True": lambda ctx: ctx.key,
        "statistics": lambda ctx: ctx.statistic("anything"),
        "full=True": lambda ctx: ctx.logits,
    }
    for declared in (Needs(cls_row=True), Needs(row_entropy=(2.0,))):
        for field, read in reads.items():

            def criterion(ctx, read=read, declared=declared):
                _ = ctx.cls_attn if declared.cls_row else ctx.row_entropy(2.0)  # what it declared: fine
                return read(ctx)

            criterion.needs = declared
            fn = make_criterion(criterion)
            with pytest.raises(ValueError, match=rf"did not declare: add {field}"):
                attend(Operands(q, k, v, 0.5), fn.needs, Site(), fn)


# --- a new statistic and its criterion, written here only: nothing in renyiprune changes -----------


def _start_row_peak(B, H, N, dtype, device):
    return torch.empty(B, H, N, dtype=dtype, device=device)


def _fold_row_peak(state, chunk):
    state[chunk.images, :, chunk.rows] = chunk.probs.amax(dim=-1)
    return state


@pytest.fixture
def row_peak_criterion():
    """Registers the statistic ``row_peak`` (each row's largest probability, per head) and the criterion
    ``peaky`` that reads it (peaked rows rank high), then removes both."""
    from renyiprune.core.attention import STATISTICS, register_statistic
    from renyiprune.core.criteria import register_criterion

    register_statistic("row_peak", _start_row_peak, _fold_row_peak, finish=lambda s: s.clone())

    @register_criterion("peaky", needs=Needs(statistics=("row_peak",)))
    def peaky(ctx):
        return ctx.patches(ctx.statistic("row_peak").mean(dim=1))

    yield peaky
    del CRITERIA["peaky"], STATISTICS["row_peak"]


def test_a_new_statistic_needs_no_edit_of_the_package(row_peak_criterion):
    """The statistic and its criterion above are streamed in chunks (any chunk size), equal the explicit
    context's in float64, keep the explicit path's tokens in a patched model, and an undeclared read of
    it fails naming the field."""
    B, H, N, d = 3, 2, 37, 8
    q, k, v = qkv(B, H, N, d, seed=12)
    want = reference(q, k, v, 0.3)
    peak = torch.stack([p.amax(-1) for p in (q @ k.transpose(-1, -2) * 0.3).softmax(-1).unbind(0)])
    fn = make_criterion("peaky")
    assert fn.needs.per_query and fn.needs == Needs(statistics=("row_peak",))
    for chunk in (1, 3000, None):
        out, ctx, scores = attend(Operands(q, k, v, 0.3), fn.needs, Site(chunk_bytes=chunk), fn)
        assert isinstance(ctx, StreamedContext)
        torch.testing.assert_close(out, want["out"], atol=F64, rtol=0)
        torch.testing.assert_close(scores, peak.mean(1)[:, 1:], atol=F64, rtol=0)
    _, explicit, scores = attend(Operands(q, k, v, 0.3), FULL, Site(), fn)
    torch.testing.assert_close(scores, peak.mean(1)[:, 1:], atol=F64, rtol=0)
    (ls, ks), (le, ke) = _both_paths(small_vit(), torch.randn(2, 3, 64, 64, dtype=torch.float64),
                                     keep_rate=0.6, criterion="peaky", locations=(1, 3))  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(ks, ke, strict=True))
    torch.testing.assert_close(ls, le, atol=1e-10, rtol=0)

    def sneaky(ctx):
        return ctx.patches(ctx.statistic("row_peak").mean(dim=1))

    sneaky.needs = Needs(row_entropy=(2.0,))
    with pytest.raises(ValueError, match="add statistics=\\('row_peak',\\)"):
        attend(Operands(q, k, v, 0.3), sneaky.needs, Site(), make_criterion(sneaky))
    with pytest.raises(ValueError, match="unknown statistic 'nope'"):
        attend(Operands(q, k, v, 0.3), Needs(statistics=("nope",)), Site())


def test_make_criterion_runs_no_attention(monkeypatch):
    """Options are checked without computing any attention: the pipeline is never called."""
    from renyiprune.core import streamed

    def boom(*a, **k):
        raise AssertionError("make_criterion computed attention")

    monkeypatch.setattr(streamed, "attend", boom)
    monkeypatch.setattr(torch, "matmul", boom)
    for name in CRITERIA:
        make_criterion(name)
    with pytest.raises(ValueError, match="norm"):
        make_criterion("column_norm", norm=0.5)


def test_bad_alpha_in_needs():
    with pytest.raises(ValueError, match="alpha"):
        Needs(row_entropy=(-1.0,))


# --- pruning blocks: the streamed path against the explicit one ------------------------------------


def small_vit():
    from renyiprune.models.model import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(img_size=64, patch_size=8, embed_dim=48, depth=6, num_heads=3, num_classes=10)
    return m.double().eval()


def _both_paths(model, x, **kw):
    """Logits and kept sets of the default (streamed) path and of the explicit one, same patch."""
    import renyiprune as rp

    rp.patch(model, **kw)
    out = []
    for attention in ("streamed", "explicit"):
        model.renyiprune.attention = attention
        model.renyiprune.step.zero_()  # criterion random draws per forward step
        with torch.inference_mode():
            logits = model(x)
        out.append((logits, [r.kept.clone() for r in model.renyiprune.records]))
    model.renyiprune.attention = "streamed"
    return out


def _model_configs():
    alpha_takers = {"renyi", "shannon", "hybrid", "evit_renyi"}
    for name in CRITERIA:
        alphas = (1.0, 2.0, math.inf) if name in alpha_takers - {"shannon"} else (None,)
        for a in alphas:
            yield name, a


@pytest.mark.parametrize("removed", ["drop", "fuse", "merge"])
def test_kept_sets_equal_explicit_float64_every_criterion(removed):
    """Every registered criterion, alpha in {1, 2, inf} where it takes one: the streamed pruning blocks
    keep exactly the explicit path's tokens at every stage (float64), and the logits agree to rounding
    (1e-10: float64 sums of O(1) terms over ~65 tokens, through six blocks). With merging, later blocks
    add the token-size key bias, which the streamed chunks add too."""
    m = small_vit()
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    for name, a in _model_configs():
        kw = dict(keep_rate=0.6, criterion=name, locations=(1, 3, 4), removed=removed)
        if a is not None:
            kw["alpha"] = a
        (ls, ks), (le, ke) = _both_paths(m, x, **kw)
        assert len(ks) == 3 and all(torch.equal(p, q) for p, q in zip(ks, ke, strict=True)), kw
        torch.testing.assert_close(ls, le, atol=1e-10, rtol=0, msg=str(kw))


@pytest.mark.parametrize("order", ["entropy", "cls_attention"])
@pytest.mark.parametrize("alpha", [1.0, 2.0, math.inf])
def test_entropy_aware_tome_streams_like_explicit(order, alpha):
    m = small_vit()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    kw = dict(method="tome", r=6, entropy_weight=0.5, alpha=alpha, merge_order=order)
    (ls, _), (le, _) = _both_paths(m, x, **kw)
    torch.testing.assert_close(ls, le, atol=1e-10, rtol=0)


def test_training_uses_the_explicit_path_and_gets_gradients():
    """Under autograd the pruning blocks take the explicit path (the chunks write into buffers); the
    gradient reaches the attention weights and the result equals the streamed inference forward."""
    import renyiprune as rp
    from renyiprune.core.blocks import _streams

    m = small_vit()
    rp.patch(m, keep_rate=0.6, criterion="renyi", alpha=2.0, locations=(1, 3))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.inference_mode():
        want = m(x)
    out = m(x)
    out.sum().backward()
    assert m.blocks[1].attn.qkv.weight.grad is not None
    torch.testing.assert_close(out.detach(), want, atol=1e-10, rtol=0)
    h = torch.zeros(1, requires_grad=True)
    assert not _streams(m.renyiprune, h) and _streams(m.renyiprune, h.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pruned_peak_memory_at_most_unpruned(dtype, request):
    """The issue's memory target on DeiT-S at 384 px (batch 1): at keep 0.9 a pruned forward's peak is at
    most the unpruned one for EViT (SDPA + CLS row) and Rényi (chunks); the explicit path, which
    this tracker also measures, is far above (its (B, H, N, N) float32 attention, N = 577)."""
    import renyiprune as rp
    from renyiprune.core.api import share_parameters
    from renyiprune.experiments.benchmark import forward_memory
    from renyiprune.models.model import create_model

    if dtype == torch.bfloat16:
        request.getfixturevalue("bf16_attention")  # skips where torch cannot run bfloat16 attention
    torch.manual_seed(0)
    model = create_model("deit_small_patch16_224", img_size=384).eval()
    x = torch.randn(1, 3, 384, 384)
    base = forward_memory(model, x, dtype).peak
    for crit, alpha in (("evit", 1.0), ("renyi", 1.0), ("renyi", math.inf)):
        view = rp.patch(share_parameters(model), keep_rate=0.9, criterion=crit, alpha=alpha)
        assert forward_memory(view, x, dtype).peak <= base, crit
        view.renyiprune.attention = "explicit"
        assert forward_memory(view, x, dtype).peak > 1.1 * base, crit
