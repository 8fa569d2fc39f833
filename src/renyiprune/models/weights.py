"""Reading, checking and downloading checkpoint weights.

Nothing here knows about particular models or the command line: this module reads state dicts from
.safetensors / .pth files (by their content: a file that is neither, or weights holding NaN or Inf, is
refused with one line), loads them strictly (every mismatch reported at once), resamples position
embeddings to a new patch grid, downloads files into a hash-verified cache, and gives a file's SHA-256
(computed once per version of the file), which is what result caches key weights by.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import sys
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.io import DigestMismatch, DownloadError, LocalWriteError, download_verified, file_digest

__all__ = [
    "WeightsError",
    "read_state_dict",
    "load_state_dict_strict",
    "resample_pos_embed",
    "cache_dir",
    "download",
    "sha256_file",
]

StateDict = dict[str, Tensor]

# Wrapper keys of training checkpoints, tried in this order ("model_ema" only when neither other is there).
_WRAPPER_KEYS = ("model", "state_dict", "model_ema")
_DDP_PREFIX = "module."
_MAX_LISTED = 8  # keys shown per list in a mismatch message
_CHUNK = 1 << 20
_CHECKED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class WeightsError(RuntimeError):
    """A checkpoint could not be read, downloaded, verified or matched to a model."""


# --------------------------------------------------------------------------------------------- reading


def read_state_dict(path: str | os.PathLike[str]) -> StateDict:
    """Read a state dict from .safetensors or a torch pickle (.pth/.pt/.bin), unwrapped and on the CPU.

    Training checkpoints ({"model": ...}, {"state_dict": ...}, {"model_ema": ...}) are unwrapped and a
    DDP "module." prefix is stripped, so the result can be compared key by key with a model.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsError(f"weights file not found: {p}")
    if not p.is_file():
        raise WeightsError(f"weights path is not a file: {p}")
    obj = _load_safetensors(p) if _file_format(p) == "safetensors" else _load_torch(p)
    return _check_finite(_strip_ddp_prefix(_unwrap(obj, p)), p)


def _file_format(p: Path) -> str:
    """The format, "safetensors" or "torch", told by the first bytes (whatever the suffix says);
    WeightsError for a file that is neither (text, an image, empty) instead of what the unpickler makes
    of it."""
    with open(p, "rb") as f:
        head = f.read(16)
    zipped = head.startswith((b"PK\x03\x04", b"PK\x05\x06"))  # torch.save's zip archive
    if zipped or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):  # a pickle
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":  # an 8-byte header length, then the JSON header
        return "safetensors"
    raise WeightsError(f"{p}: not a PyTorch/safetensors weights file ({_describe(head)})")


def _describe(head: bytes) -> str:
    if not head:
        return "the file is empty"
    if all(32 <= b < 127 or b in b"\t\n\r" for b in head):
        lines = head.decode("ascii").strip().splitlines()
        return f"it begins with text: {lines[0]!r}" if lines else "it begins with blank lines"
    return f"it begins with the bytes {head[:8].hex(' ')}"


def _check_finite(sd: StateDict, p: Path) -> StateDict:
    """Refuse weights with NaN or Inf, naming the first tensor that has them: they would only give a
    silent chance-level accuracy or a NaN in a results file later."""
    for name, t in sd.items():
        if not (t.is_floating_point() or t.is_complex()):
            continue
        v = t if t.is_complex() or t.dtype in _CHECKED_DTYPES else t.float()  # float8 etc.: no isfinite
        bad = ~torch.isfinite(v)
        if bool(bad.any()):
            nan = int(torch.isnan(v).sum())
            raise WeightsError(
                f"{p}: tensor {name!r} holds non-finite values ({nan} NaN, {int(bad.sum()) - nan} infinite, "
                f"of {t.numel()}); refusing weights that are not finite (a diverged or corrupted checkpoint?)"
            )
    return sd


def _load_safetensors(p: Path) -> object:
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device="cpu")
    except Exception as e:  # SafetensorError has no stable import path; any failure here means a bad file
        raise WeightsError(f"weights file is corrupt or truncated: {p} ({e})") from e


def _load_torch(p: Path) -> object:
    try:
        with open(p, "rb") as f:  # an open file: torch.load would go by a ".safetensors" suffix
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise WeightsError(
                f"weights file {p} holds Python objects besides tensors, which are not loaded for safety "
                "(torch.load weights_only=True); if you trust it, re-save only its state dict, e.g. "
                "torch.save(ckpt['model'], 'weights.pth')"
            ) from e
        raise WeightsError(f"weights file is corrupt or truncated: {p} ({_first_line(e)})") from e
    except Exception as e:  # RuntimeError, EOFError, KeyError...: what a damaged archive or pickle raises
        raise WeightsError(f"weights file is corrupt or truncated: {p} ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _unwrap(obj: object, p: Path) -> StateDict:
    """Descend through wrapper keys until a flat str -> Tensor mapping is reached."""
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    if not isinstance(obj, Mapping) or not _is_state_dict(obj):
        if isinstance(obj, Mapping):
            found = f"keys {sorted(map(str, obj))[:_MAX_LISTED]}"
        else:
            found = type(obj).__name__
        raise WeightsError(
            f"{p} does not contain a state dict of tensors (found {found}); expected a mapping of names to "
            f"tensors, possibly under one of {list(_WRAPPER_KEYS)}"
        )
    return dict(obj)


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _strip_ddp_prefix(sd: StateDict) -> StateDict:
    """Remove the "module." prefix that DistributedDataParallel adds, when every key carries it."""
    if sd and all(k.startswith(_DDP_PREFIX) for k in sd):
        return {k[len(_DDP_PREFIX) :]: v for k, v in sd.items()}
    return sd


# --------------------------------------------------------------------------------------------- loading


def load_state_dict_strict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    adapt: Callable[[dict, nn.Module], dict] | None = None,
    drop_prefixes: Sequence[str] = (),
) -> None:
    """Load state_dict into model, raising WeightsError that lists every missing/unexpected/mis-shaped key.

    adapt(state_dict, model) may first rewrite the checkpoint (e.g. resample position embeddings); keys
    starting with any of drop_prefixes are left out of both check and load, so they keep the model's init.
    Nothing is loaded unless everything matches.
    """
    sd = dict(state_dict)
    if adapt is not None:
        sd = dict(adapt(sd, model))
    prefixes = tuple(drop_prefixes)

    def kept(k: str) -> bool:
        return not (prefixes and k.startswith(prefixes))

    sd = {k: v for k, v in sd.items() if kept(k)}
    expected = {k: v for k, v in model.state_dict().items() if kept(k)}  # excludes non-persistent buffers

    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    misshaped = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    problems = [("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)]
    if missing or unexpected or misshaped:
        lines = [f"{name} ({len(keys)}): {_listing(keys)}" for name, keys in problems if keys]
        raise WeightsError(f"checkpoint does not match {type(model).__name__}:\n  " + "\n  ".join(lines))

    result = model.load_state_dict(sd, strict=False)
    leftover = [k for k in result.missing_keys if kept(k)] + list(result.unexpected_keys)
    if leftover:  # cannot happen after the checks above unless the model's state_dict is inconsistent
        name = type(model).__name__
        raise WeightsError(f"checkpoint did not load cleanly into {name}: {_listing(leftover)}")


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown if len(items) <= _MAX_LISTED else f"{shown}, ... ({len(items) - _MAX_LISTED} more)"


# ------------------------------------------------------------------------------- position embeddings


def resample_pos_embed(pos_embed: Tensor, new_grid: tuple[int, int], num_prefix_tokens: int = 1) -> Tensor:
    """Bicubically resample an absolute position embedding (1, P + G*G, C) to a new (H, W) patch grid.

    The P prefix tokens (CLS, distillation) are kept as they are; the patch part is interpolated in
    float32 (antialiased when shrinking) so a checkpoint trained at one resolution can run at another.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        shape = tuple(pos_embed.shape)
        raise WeightsError(f"position embedding must have shape (1, tokens, dim), got {shape}")
    new_h, new_w = (int(x) for x in new_grid)
    if new_h < 1 or new_w < 1:
        raise WeightsError(f"new position-embedding grid must be positive, got {tuple(new_grid)}")
    n_patch = pos_embed.shape[1] - num_prefix_tokens
    old = math.isqrt(max(n_patch, 0))
    if num_prefix_tokens < 0 or n_patch < 1 or old * old != n_patch:
        raise WeightsError(
            f"position embedding with {pos_embed.shape[1]} tokens and {num_prefix_tokens} prefix tokens "
            "does not hold a square patch grid"
        )
    if (new_h, new_w) == (old, old):
        return pos_embed

    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[2]
    grid = patches.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    shrink = new_h < old or new_w < old
    grid = F.interpolate(grid, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=shrink)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


# ------------------------------------------------------------------------------------ download/cache


def cache_dir() -> Path:
    """Folder for downloaded weights: $RENYIPRUNE_CACHE, or ~/.cache/renyiprune."""
    return Path(os.environ.get("RENYIPRUNE_CACHE") or "~/.cache/renyiprune").expanduser()


#: Digests remembered in this process, by (resolved path, device, inode, size, mtime_ns).
_DIGESTS: dict[tuple, str] = {}
_SETTLED_NS = 2_000_000_000  # a file modified more recently than this is hashed again each time


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes: what result caches key weights by (a file name says nothing).

    Computed once per version of the file: remembered in this process by (resolved path, device, inode,
    size, mtime_ns), so another checkpoint written at the same path (a new inode, size or mtime) is
    hashed anew. A file modified in the last 2 s is not remembered: a rewrite within the file system's
    clock tick could keep its mtime.
    """
    p = Path(path).expanduser().resolve()
    key = _stat_key(p)
    if key in _DIGESTS:
        return _DIGESTS[key]
    digest = file_digest(p, "sha256")
    if _stat_key(p) == key and time.time_ns() - key[-1] >= _SETTLED_NS:  # unchanged while read, settled
        _DIGESTS[key] = digest
    return digest


def _stat_key(p: Path) -> tuple:
    st = p.stat()
    return (str(p), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def download(url: str, sha256: str, filename: str | None = None, *, progress: bool = True) -> Path:
    """Return the cached copy of url, downloading and verifying it first if needed.

    sha256 is a full hex digest or a prefix of at least 8 hex digits (as in torch.hub file names). The file
    is written to a temporary name and renamed into place only once its hash verifies, so the cache never
    holds a partial or wrong file.
    """
    expected = _check_digest(sha256)
    name = filename or Path(urllib.parse.urlparse(url).path).name
    if not name:
        raise WeightsError(f"cannot tell a file name from the URL {url}; pass filename=")
    folder = cache_dir()
    target = folder / name
    if target.is_file():
        if sha256_file(target).startswith(expected):
            return target
        print(f"renyiprune: cached {target} fails its SHA-256 check; downloading it again", file=sys.stderr)
        target.unlink()
    try:
        return download_verified(url, target, expected, kind="sha256", progress=progress)
    except LocalWriteError as e:
        raise WeightsError(
            f"cannot write to the cache folder {folder} ({e.cause}); set RENYIPRUNE_CACHE"
        ) from e
    except DigestMismatch as e:
        raise WeightsError(f"{e}; the download was discarded") from None
    except DownloadError as e:
        raise WeightsError(
            f"could not download {url}: {e.why}. Download the file on a machine with access and pass it with "
            "--weights PATH (command line) or weights=PATH (Python)."
        ) from e
    except ValueError as e:  # urllib's answer to a malformed or unsupported URL
        raise WeightsError(f"cannot download {url!r}: {e}") from e


def _check_digest(sha256: str) -> str:
    digest = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", digest):
        raise WeightsError(f"expected SHA-256 must be 8 to 64 hex digits, got {sha256!r}")
    return digest
