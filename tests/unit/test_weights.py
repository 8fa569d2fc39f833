"""Tests for renyiprune.weights: reading, strict loading, position-embedding resampling, download cache."""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from renyiprune.models.weights import (
    WeightsError,
    cache_dir,
    download,
    load_state_dict_strict,
    read_state_dict,
    resample_pos_embed,
    sha256_file,
)

ASSETS = Path("/work/shared/assets/weights")
REAL = ASSETS / "deit_tiny_patch16_224.safetensors"
REAL_SHA256 = "c538baa6589a6c4c0c0427f24719ba2ebe30b86f05c41ec3670cdafe3267e850"

needs_real = pytest.mark.skipif(not REAL.is_file(), reason=f"real DeiT-Tiny weights not present at {REAL}")


@pytest.fixture(scope="module")
def real_sd() -> dict[str, torch.Tensor]:
    if not REAL.is_file():
        pytest.skip(f"real DeiT-Tiny weights not present at {REAL}")
    return read_state_dict(REAL)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------ reading


@needs_real
def test_real_file_sha256_matches_published_digest():
    assert sha256_file(REAL) == REAL_SHA256


def test_sha256_file_matches_hashlib(tmp_path):
    f = tmp_path / "x.bin"
    data = bytes(range(256)) * 5000  # spans several read chunks
    f.write_bytes(data)
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()


@pytest.fixture
def digests(monkeypatch) -> list[str]:
    """The files sha256_file actually reads (its in-process memory starts empty)."""
    from renyiprune.models import weights

    monkeypatch.setattr(weights, "_DIGESTS", {})
    read: list[str] = []
    real = weights.file_digest

    def spy(path, kind="sha256"):
        read.append(str(path))
        return real(path, kind)

    monkeypatch.setattr(weights, "file_digest", spy)
    return read


def settle(path: Path, age_s: float = 3600) -> None:
    """Give ``path`` an mtime ``age_s`` in the past (a file written earlier than the last 2 s)."""
    t = time.time() - age_s
    os.utime(path, (t, t))


def test_sha256_file_is_read_once_per_version_of_the_file(tmp_path, digests):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"a" * 1000)
    settle(f)
    first = sha256_file(f)
    assert sha256_file(tmp_path / "." / "model.safetensors") == first and len(digests) == 1  # remembered
    f.write_bytes(b"a" * 1001)  # another size, same mtime
    settle(f)
    assert sha256_file(f) == hashlib.sha256(b"a" * 1001).hexdigest() and len(digests) == 2
    f.write_bytes(b"b" * 1001)  # same size, another mtime
    settle(f, 1800)
    assert sha256_file(f) == hashlib.sha256(b"b" * 1001).hexdigest() and len(digests) == 3
    os.replace(tmp_path / "model.safetensors", tmp_path / "old")  # same stat, but another file there now
    (tmp_path / "model.safetensors").write_bytes(b"c" * 1001)
    settle(tmp_path / "model.safetensors", 1800)
    assert sha256_file(f) == hashlib.sha256(b"c" * 1001).hexdigest() and len(digests) == 4


def test_sha256_file_does_not_remember_a_file_written_just_now(tmp_path, digests):
    f = tmp_path / "model.safetensors"
    for content in (b"x" * 64, b"y" * 64):  # same size, maybe the same mtime tick
        f.write_bytes(content)
        assert sha256_file(f) == hashlib.sha256(content).hexdigest()
    assert len(digests) == 2


@needs_real
def test_real_safetensors_reads_as_timm_deit(real_sd):
    assert len(real_sd) == 152
    assert real_sd["pos_embed"].shape == (1, 197, 192)
    assert real_sd["cls_token"].shape == (1, 1, 192)
    assert real_sd["patch_embed.proj.weight"].shape == (192, 3, 16, 16)
    assert "blocks.0.attn.qkv.weight" in real_sd and "head.bias" in real_sd


@needs_real
@pytest.mark.parametrize("form", ["official", "plain", "ddp"])
def test_real_weights_round_trip_through_pth(real_sd, tmp_path, form):
    if form == "official":
        obj = {"model": real_sd}
    elif form == "plain":
        obj = real_sd
    else:
        obj = {f"module.{k}": v for k, v in real_sd.items()}
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    assert_same(read_state_dict(path), real_sd)


def small_sd() -> dict[str, torch.Tensor]:
    return {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3), "n": torch.tensor(7)}


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd},
        lambda sd: {"model_ema": sd, "epoch": 3},
        lambda sd: {"model": sd, "model_ema": {k: v + 1 for k, v in sd.items()}, "epoch": 3},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    ],
    ids=["state_dict", "model_ema_only", "model_preferred_over_ema", "state_dict_ddp"],
)
@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_training_checkpoint_wrappers_are_unwrapped(tmp_path, wrap, suffix):
    sd = small_sd()
    path = tmp_path / f"w{suffix}"
    torch.save(wrap(sd), path)
    assert_same(read_state_dict(path), sd)


def test_module_prefix_kept_when_not_on_every_key(tmp_path):
    sd = {"module.x": torch.ones(1), "y": torch.zeros(1)}
    torch.save(sd, tmp_path / "w.pth")
    assert set(read_state_dict(tmp_path / "w.pth")) == {"module.x", "y"}


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsError, match="not found") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


@needs_real
def test_truncated_safetensors_is_reported(tmp_path):
    data = REAL.read_bytes()
    path = tmp_path / "half.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="corrupt or truncated") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


@needs_real
def test_safetensors_with_flipped_header_length_is_reported(tmp_path):
    data = bytearray(REAL.read_bytes())
    data[:8] = bytes(b ^ 0xFF for b in data[:8])
    path = tmp_path / "flipped.safetensors"
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupt or truncated") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_truncated_pth_is_reported(tmp_path):
    full = tmp_path / "full.pth"
    torch.save({"model": {"w": torch.randn(256, 256)}}, full)
    data = full.read_bytes()
    path = tmp_path / "half.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="corrupt or truncated") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "name, content, why",
    [
        ("x.pth", b"hello world\nthis is text\n", "it begins with text: 'hello world'"),  # was a KeyError
        ("garbage.pth", b"not a checkpoint" * 64, "it begins with text: 'not a checkpoint'"),
        ("empty.pth", b"", "the file is empty"),
        ("photo.safetensors", b"\x89PNG\r\n\x1a\n" + bytes(64), "it begins with the bytes 89 50 4e 47"),
        ("config.bin", b'{"model": "deit"}\n', """it begins with text: '{"model": "deit"'"""),
    ],
)
def test_files_that_are_not_weights_are_named_in_one_line(tmp_path, name, content, why):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(WeightsError) as info:
        read_state_dict(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: not a PyTorch/safetensors weights file (") and why in msg
    assert "\n" not in msg


def test_the_format_is_told_by_the_bytes_not_the_suffix(tmp_path):
    from safetensors.torch import save_file

    sd = small_sd()
    save_file(sd, tmp_path / "really-safetensors.pth")
    torch.save(sd, tmp_path / "really-torch.safetensors")
    got = read_state_dict(tmp_path / "really-safetensors.pth")  # safetensors keeps its own key order
    assert_same(dict(sorted(got.items())), dict(sorted(sd.items())))
    assert_same(read_state_dict(tmp_path / "really-torch.safetensors"), sd)


@pytest.mark.parametrize("value, what", [(math.nan, "1 NaN, 0 infinite"), (-math.inf, "0 NaN, 1 infinite")])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_non_finite_weights_are_refused_naming_the_first_tensor(tmp_path, value, what, suffix):
    from safetensors.torch import save_file

    sd = {"a.weight": torch.randn(3, 2), "b.weight": torch.randn(4, 4), "c.weight": torch.randn(2)}
    sd["b.weight"][1, 2] = value
    sd["c.weight"][0] = float("nan")  # a later one is not the one named
    path = tmp_path / f"diverged{suffix}"
    save_file(sd, path) if suffix == ".safetensors" else torch.save({"model": sd}, path)
    with pytest.raises(WeightsError) as info:
        read_state_dict(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: tensor 'b.weight' holds non-finite values ({what}, of 16)")
    assert "c.weight" not in msg and "\n" not in msg


def test_half_precision_and_integer_tensors_pass_the_finite_check(tmp_path):
    sd = {"h": torch.randn(4).half(), "b": torch.randn(4).bfloat16(), "i": torch.tensor([2**31 - 1])}
    torch.save(sd, tmp_path / "w.pth")
    assert_same(read_state_dict(tmp_path / "w.pth"), sd)


def test_pickled_python_objects_are_refused_not_called_corrupt(tmp_path):
    path = tmp_path / "train.pth"
    torch.save({"model": small_sd(), "args": argparse.Namespace(lr=1e-3)}, path)
    with pytest.raises(WeightsError, match="weights_only") as info:
        read_state_dict(path)
    assert "corrupt" not in str(info.value)


@pytest.mark.parametrize("obj", [[torch.ones(1)], {"epoch": 3}, {}], ids=["list", "no_tensors", "empty"])
def test_non_state_dict_content_is_reported(tmp_path, obj):
    path = tmp_path / "odd.pth"
    torch.save(obj, path)
    with pytest.raises(WeightsError, match="does not contain a state dict"):
        read_state_dict(path)


# -------------------------------------------------------------------------------------- strict load


class Tiny(nn.Module):
    def __init__(self, hidden: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Linear(2, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, classes)
        self.register_buffer("scale", torch.ones(hidden))
        self.register_buffer("cache", torch.zeros(5), persistent=False)


def test_strict_load_copies_all_tensors():
    src, dst = Tiny(), Tiny()
    with torch.no_grad():
        src.scale.fill_(2.0)
    load_state_dict_strict(dst, src.state_dict())
    assert_same(dst.state_dict(), src.state_dict())
    assert "cache" not in src.state_dict()  # non-persistent buffers are neither required nor loaded


def test_strict_load_names_missing_unexpected_and_misshaped_keys():
    sd = Tiny().state_dict()
    del sd["norm.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["head.weight"] = torch.zeros(7, 4)
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError) as info:
        load_state_dict_strict(model, sd)
    msg = str(info.value)
    assert "missing keys (1): norm.bias" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "head.weight: checkpoint (7, 4) vs model (3, 4)" in msg
    assert "body.weight" not in msg
    assert_same(model.state_dict(), before)  # nothing was loaded


def test_strict_load_truncates_long_key_lists():
    sd = Tiny().state_dict()
    sd.update({f"junk.{i}": torch.zeros(1) for i in range(30)})
    with pytest.raises(WeightsError) as info:
        load_state_dict_strict(Tiny(), sd)
    msg = str(info.value)
    assert "unexpected keys (30)" in msg
    assert "(22 more)" in msg
    assert "junk.29" not in msg


def test_drop_prefixes_keep_model_init_for_replaced_head():
    src, dst = Tiny(classes=1000), Tiny(classes=10)
    head_before = dst.head.weight.detach().clone()
    sd = src.state_dict()
    with pytest.raises(WeightsError, match="mis-shaped"):
        load_state_dict_strict(dst, sd)
    load_state_dict_strict(dst, sd, drop_prefixes=("head.",))
    assert torch.equal(dst.head.weight, head_before)
    assert torch.equal(dst.body.weight, src.body.weight)
    assert torch.equal(dst.norm.weight, src.norm.weight)


def test_adapt_runs_before_the_check():
    src, dst = Tiny(hidden=4), Tiny(hidden=4)
    renamed = {f"old_{k}": v for k, v in src.state_dict().items()}
    seen = []

    def adapt(sd, model):
        seen.append(model)
        return {k.removeprefix("old_"): v for k, v in sd.items()}

    with pytest.raises(WeightsError, match="missing keys"):
        load_state_dict_strict(dst, renamed)
    load_state_dict_strict(dst, renamed, adapt=adapt)
    assert seen == [dst]
    assert_same(dst.state_dict(), src.state_dict())


# --------------------------------------------------------------------------- position embeddings


def test_resample_identity_when_grid_unchanged():
    pe = torch.randn(1, 1 + 14 * 14, 8)
    assert torch.equal(resample_pos_embed(pe, (14, 14)), pe)


def test_resample_up_and_down_shapes_keep_prefix_and_dtype():
    pe = torch.randn(1, 2 + 14 * 14, 8, dtype=torch.float16)
    up = resample_pos_embed(pe, (24, 24), num_prefix_tokens=2)
    assert up.shape == (1, 2 + 24 * 24, 8) and up.dtype == torch.float16
    assert torch.equal(up[:, :2], pe[:, :2])
    down = resample_pos_embed(pe.float(), (7, 10), num_prefix_tokens=2)
    assert down.shape == (1, 2 + 7 * 10, 8)
    assert torch.isfinite(down).all()


@needs_real
def test_resample_real_pos_embed_14_to_24(real_sd):
    pe = real_sd["pos_embed"]
    out = resample_pos_embed(pe, (24, 24))
    assert out.shape == (1, 1 + 24 * 24, 192)
    assert torch.equal(out[:, 0], pe[:, 0])
    # a round trip back to 14x14 stays close to the original
    back = resample_pos_embed(out, (14, 14))
    assert (back - pe).abs().max() < 0.25 * pe.abs().max()


def test_resample_linear_ramp_stays_linear():
    old, new = 14, 24
    rows = torch.arange(old, dtype=torch.float32).view(old, 1).expand(old, old)
    cols = torch.arange(old, dtype=torch.float32).view(1, old).expand(old, old)
    patches = torch.stack([rows, 2 * cols], -1).reshape(1, old * old, 2)
    pe = torch.cat([torch.full((1, 1, 2), -5.0), patches], 1)
    out = resample_pos_embed(pe, (new, new))
    assert torch.equal(out[:, 0], pe[:, 0])
    grid = out[0, 1:].reshape(new, new, 2)
    # half-pixel centres (align_corners=False): output i samples input (i + 0.5) * old / new - 0.5
    src = (torch.arange(new, dtype=torch.float32) + 0.5) * old / new - 0.5
    # Bicubic clamps at the borders, so check the interior; PyTorch's cubic kernel (a = -0.75) reproduces
    # a ramp only to within ~0.05 of a grid step, hence the tolerance.
    inner = slice(3, new - 3)
    n = new - 6
    assert torch.allclose(grid[inner, inner, 0], src[inner].view(-1, 1).expand(n, n), atol=0.06)
    assert torch.allclose(grid[inner, inner, 1], 2 * src[inner].view(1, -1).expand(n, n), atol=0.12)
    assert torch.allclose(grid[:, :, 0], grid[:, :1, 0].expand(new, new))  # constant along the other axis
    assert (grid[1:, :, 0] - grid[:-1, :, 0] > 0).all()  # monotone everywhere, borders included


@pytest.mark.parametrize("new,antialias", [(24, False), (10, True)], ids=["up", "down"])
def test_resample_matches_bicubic_reference_antialiased_only_when_shrinking(new, antialias):
    pe = torch.randn(1, 1 + 14 * 14, 6)
    grid = pe[0, 1:].reshape(14, 14, 6).permute(2, 0, 1)[None]
    ref = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False, antialias=antialias)
    out = resample_pos_embed(pe, (new, new))
    assert torch.allclose(out[0, 1:], ref[0].permute(1, 2, 0).reshape(new * new, 6), atol=1e-6)


@pytest.mark.parametrize("shape,prefix", [((1, 1 + 15, 4), 1), ((1, 197, 4), 2), ((197, 4), 1)])
def test_resample_rejects_non_square_grids(shape, prefix):
    with pytest.raises(WeightsError):
        resample_pos_embed(torch.zeros(shape), (24, 24), num_prefix_tokens=prefix)


# --------------------------------------------------------------------------------- download/cache


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("RENYIPRUNE_CACHE", str(folder))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return folder


@pytest.fixture
def source(tmp_path) -> tuple[Path, str]:
    src = tmp_path / "src" / "tiny-weights.pth"
    src.parent.mkdir()
    src.write_bytes(b"some checkpoint bytes" * 1000)
    return src, hashlib.sha256(src.read_bytes()).hexdigest()


def cache_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("RENYIPRUNE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RENYIPRUNE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "renyiprune"


@pytest.mark.parametrize("digest_len", [64, 8])
def test_download_file_url_with_full_digest_or_prefix(cache, source, digest_len, capsys):
    src, digest = source
    path = download(src.as_uri(), digest[:digest_len].upper(), progress=False)
    assert path == cache / "tiny-weights.pth"
    assert path.read_bytes() == src.read_bytes()
    assert cache_files(cache) == [path]
    assert capsys.readouterr().err == ""
    src.unlink()  # a second call is served from the cache without touching the URL
    assert download(src.as_uri(), digest, progress=False) == path


def test_download_custom_filename_and_progress_bar(cache, source, capsys):
    src, digest = source
    path = download(src.as_uri(), digest, "renamed.bin")
    assert path == cache / "renamed.bin" and path.is_file()
    assert "renamed.bin" in capsys.readouterr().err


def test_download_hash_mismatch_leaves_nothing(cache, source):
    src, digest = source
    wrong = "0" * 64
    with pytest.raises(WeightsError, match="SHA-256 mismatch") as info:
        download(src.as_uri(), wrong, progress=False)
    assert wrong in str(info.value) and digest in str(info.value)
    assert cache_files(cache) == []


def test_corrupted_cached_file_is_replaced(cache, source):
    src, digest = source
    cache.mkdir()
    (cache / src.name).write_bytes(b"damaged")
    path = download(src.as_uri(), digest, progress=False)
    assert path.read_bytes() == src.read_bytes()
    assert cache_files(cache) == [path]


def test_corrupted_cached_file_is_deleted_even_if_the_new_download_fails(cache, source):
    src, _ = source
    cache.mkdir()
    (cache / src.name).write_bytes(b"damaged")
    with pytest.raises(WeightsError, match="mismatch"):
        download(src.as_uri(), "f" * 64, progress=False)
    assert cache_files(cache) == []


def test_unreachable_url_says_how_to_pass_weights(cache):
    url = "http://127.0.0.1:9/x.pth"
    with pytest.raises(WeightsError) as info:
        download(url, "a1311bcf", progress=False)
    msg = str(info.value)
    assert url in msg and "no network access" in msg
    assert "--weights" in msg and "weights=" in msg
    assert cache_files(cache) == []


@pytest.mark.parametrize("bad", ["abc", "xyz12345", "0" * 65])
def test_download_rejects_malformed_digest(cache, source, bad):
    with pytest.raises(WeightsError, match="hex digits"):
        download(source[0].as_uri(), bad, progress=False)
    assert cache_files(cache) == []
