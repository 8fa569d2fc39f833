"""utils.io: atomically written files get the umask's mode; output_lock keeps a second process out."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from renyiprune.utils.io import (
    LOCK_FILE,
    OutputInUse,
    atomic_path,
    atomic_write_text,
    current_umask,
    download_verified,
    output_lock,
)


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_umask_mode(tmp_path, umask, mask, expected):
    umask(mask)
    assert current_umask() == mask
    text = atomic_write_text(tmp_path / "index.html", "<html></html>\n")
    with atomic_path(tmp_path / "sub" / "model.safetensors") as tmp:
        tmp.write_bytes(b"\0" * 64)
    assert mode(text) == expected  # mkstemp alone gives 0600 whatever the umask
    assert mode(tmp_path / "sub" / "model.safetensors") == expected
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert mode(plain) == expected  # the same as a file written without the atomic helper


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600)])
def test_verified_downloads_get_the_umask_mode(tmp_path, umask, mask, expected):
    src = tmp_path / "src.bin"
    src.write_bytes(b"weights" * 100)
    umask(mask)
    got = download_verified(src.as_uri(), tmp_path / "cache" / "w.bin",
                            hashlib.sha256(src.read_bytes()).hexdigest(), progress=False)  # fmt: skip
    assert got.read_bytes() == src.read_bytes() and mode(got) == expected


HOLDER = """
import sys, time
from pathlib import Path
from renyiprune.utils.io import output_lock
with output_lock(sys.argv[1]):
    Path(sys.argv[2]).write_text("locked")
    time.sleep(120)
"""


def start_holder(folder: Path, tmp_path: Path) -> subprocess.Popen:
    """Another process that takes the lock of ``folder`` and keeps it (until killed)."""
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(folder), str(ready)])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, "the lock holder exited early"
        assert time.monotonic() < deadline, "the lock holder did not start"
        time.sleep(0.05)
    return proc


def test_a_second_process_gets_one_line_naming_the_owner(tmp_path):
    folder = tmp_path / "out"
    holder = start_holder(folder, tmp_path)
    try:
        with pytest.raises(OutputInUse) as info, output_lock(folder):
            pass
        assert info.value.pid == holder.pid
        assert str(info.value) == (f"{folder} is in use by another renyiprune process (pid {holder.pid}); "
                                   "wait for it or choose another --out")  # fmt: skip
        with pytest.raises(OutputInUse, match="choose another --cache$"), output_lock(folder, "--cache"):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the OS releases the lock
        holder.wait()
    with output_lock(folder):  # no stale lock after a kill
        assert (folder / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_the_lock_is_reentrant_in_a_process_and_released_after(tmp_path):
    folder = tmp_path / "out"
    with output_lock(folder), output_lock(folder):  # sweep's run and its parts take it both
        pass
    holder = start_holder(folder, tmp_path)  # released: another process can take it now
    try:
        assert holder.poll() is None
        with pytest.raises(OutputInUse), output_lock(folder):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
