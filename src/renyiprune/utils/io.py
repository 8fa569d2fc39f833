"""Crash-safe files: one atomic writer, one verified downloader and one output-folder lock for the package.

Every file renyiprune writes (checkpoints, weights, exports, reports, caches, downloads) goes to a
temporary name in the target's folder, is flushed to disk, given the mode a plain ``open`` would give it
(``0o666`` less the umask: ``mkstemp`` alone makes it private) and renamed over the target with
``os.replace`` (atomic on POSIX and Windows): a crash or kill never leaves a truncated file. A download is
renamed into place only once its digest (SHA-256 or MD5, ``kind``) verifies. :func:`output_lock` keeps a
second process from accumulating results in a folder that one is already writing.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "atomic_path", "atomic_write", "atomic_write_text", "file_digest", "download_verified", "DownloadError",
    "DigestMismatch", "LocalWriteError", "HASH_KINDS", "output_lock", "OutputInUse", "LOCK_FILE",
    "current_umask",
]  # fmt: skip

HASH_KINDS = ("sha256", "md5")
_CHUNK = 1 << 20
_TIMEOUT_S = 30.0


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` to write to; when the block succeeds the file is fsynced,
    given the umask's mode and renamed to ``path``, otherwise removed (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        _publish(Path(tmp), path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _publish(tmp: Path, path: Path) -> None:
    """Flush ``tmp`` to disk, give it the mode a new file gets under the umask, rename it to ``path``."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)


_UMASK_GUARD = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux: /proc/self/status);
    elsewhere set and restored at once under a lock (``os.umask`` can only be read by setting it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_GUARD:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and put the result at ``path`` atomically (``atomic_path``)."""
    with atomic_path(path) as tmp:
        write(str(tmp))
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` so that the file is either complete or absent."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def file_digest(path: str | os.PathLike[str], kind: str = "sha256") -> str:
    """Hex digest (``kind``: sha256 or md5) of a file, read in chunks."""
    h = _hasher(kind)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ output lock

#: The lock file :func:`output_lock` keeps in a folder (it holds the owner's pid; it is never deleted).
LOCK_FILE = ".renyiprune.lock"
_HELD: dict[Path, list[int]] = {}  # folder -> [fd, depth]: this process's locks (re-entrant)
_HELD_GUARD = threading.Lock()


class OutputInUse(RuntimeError):
    """Another process holds the :func:`output_lock` of a folder; ``pid`` is its process id (or None)."""

    def __init__(self, message: str, pid: int | None = None):
        super().__init__(message)
        self.pid = pid


@contextlib.contextmanager
def output_lock(
    folder: str | os.PathLike[str], flag: str = "--out", *, collective: bool = False
) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if needed) for the block, so that two processes never
    accumulate results in one folder; a second one raises :class:`OutputInUse` at once, naming the owner.

    ``fcntl.flock`` on ``folder/.renyiprune.lock``: the OS drops it when the owner dies, so no lock goes
    stale. Re-entrant within a process. Under torchrun only rank 0 takes it; with ``collective`` every
    rank must enter together and all raise when rank 0 could not lock (all stop with the same line).
    Without ``fcntl`` (not POSIX) nothing is locked. ``flag`` names the option in the message.
    """
    from . import distributed as D

    folder = Path(folder)
    main = D.rank() == 0
    error = _acquire(folder, flag) if main else None
    if collective and D.is_distributed():
        error = D.broadcast_object(None if error is None else (str(error), error.pid))
        error = None if error is None else OutputInUse(*error)
    if error is not None:
        raise error
    try:
        yield folder
    finally:
        if main:
            _release(folder)


def _acquire(folder: Path, flag: str) -> OutputInUse | None:
    """Take (or re-enter) the lock of ``folder``; the error to raise when another process holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{flag} {folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    with _HELD_GUARD:
        if key in _HELD:
            _HELD[key][1] += 1
            return None
        fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _lock_owner(fd)
            os.close(fd)
            who = f"pid {pid}" if pid is not None else "pid unknown"
            why = f"{folder} is in use by another renyiprune process ({who}); wait for it or choose another"
            return OutputInUse(f"{why} {flag}", pid)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # at offset 0: the descriptor is new
        _HELD[key] = [fd, 1]
    return None


def _lock_owner(fd: int, wait_s: float = 1.0) -> int | None:
    """The pid the owner wrote into the lock file (it writes it just after locking: wait a moment)."""
    deadline = time.monotonic() + wait_s
    while True:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return int(text)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def _release(folder: Path) -> None:
    key = folder.resolve()
    with _HELD_GUARD:
        entry = _HELD.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[key]
            os.close(entry[0])  # closing the only descriptor releases the flock


# -------------------------------------------------------------------------------------- downloads


class DownloadError(OSError):
    """The download itself failed (network, server, short read); ``why`` says how (for messages)."""

    def __init__(self, url: str, why: str):
        super().__init__(f"could not download {url}: {why}")
        self.url, self.why = url, why


class DigestMismatch(ValueError):
    """The downloaded bytes do not have the expected digest; nothing was kept."""

    def __init__(self, url: str, kind: str, expected: str, actual: str):
        super().__init__(f"{kind} mismatch for {url}: expected {expected}, got {actual}")
        self.url, self.kind, self.expected, self.actual = url, kind, expected, actual


class LocalWriteError(OSError):
    """The download could not be written to the target's folder (a local disk problem, not the network)."""

    def __init__(self, folder: Path, cause: OSError):
        super().__init__(f"cannot write to {folder} ({cause})")
        self.folder, self.cause = folder, cause


def download_verified(
    url: str, target: str | os.PathLike[str], digest: str, *, kind: str = "sha256", progress: bool = True
) -> Path:
    """Stream ``url`` into a temporary file next to ``target`` with a progress bar, hashing it with ``kind``;
    rename it to ``target`` only if its digest starts with ``digest`` (a full digest, or for SHA-256 a prefix
    as in torch.hub file names). Raises DownloadError, DigestMismatch, LocalWriteError, or ValueError for
    a malformed URL."""
    target = Path(target)
    expected = digest.strip().lower()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    except OSError as e:
        raise LocalWriteError(target.parent, e) from e
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _stream(url, out, target, _hasher(kind), progress)
        if not actual.startswith(expected) or not expected:
            raise DigestMismatch(url, {"sha256": "SHA-256", "md5": "MD5"}[kind], expected, actual)
        _publish(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _hasher(kind: str):
    if kind not in HASH_KINDS:
        raise ValueError(f"hash kind must be one of {', '.join(HASH_KINDS)}, got {kind!r}")
    return hashlib.sha256() if kind == "sha256" else hashlib.md5(usedforsecurity=False)


def _stream(url: str, out, target: Path, h, progress: bool) -> str:
    """Copy ``url`` into the open binary file ``out``; return the hex digest of what was read."""
    from tqdm import tqdm

    received = 0
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            bar = tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name,
                file=sys.stderr, disable=not progress, leave=False,
            )  # fmt: skip
            with bar:
                while chunk := resp.read(_CHUNK):
                    try:
                        out.write(chunk)
                    except OSError as e:  # a local disk problem: keep it out of the network message
                        raise LocalWriteError(target.parent, e) from e
                    h.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except LocalWriteError:
        raise
    except urllib.error.HTTPError as e:
        raise DownloadError(url, f"the server answered HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise DownloadError(url, f"there appears to be no network access ({getattr(e, 'reason', e)})") from e
    if total is not None and received != total:
        raise DownloadError(url, f"the download stopped after {received} of {total} bytes")
    return h.hexdigest()
