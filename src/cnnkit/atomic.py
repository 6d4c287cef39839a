"""Write a file so that a reader never sees half of it.

Every write goes to a temporary file in the same directory, is fsynced, renamed over the final
name (an atomic replace on POSIX and Windows) and the directory is fsynced: a crash at any
moment leaves either the previous file or the new one under the final name, never a partial
one. Temporary files left by a killed writer are removed by a later write once they are old.
The final file gets the permissions of any newly created file (``0o666 & ~umask``), not the
owner-only ``0o600`` of a temporary file.

This module imports nothing of cnnkit, so every layer (training, plots, CLI) can use it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["STALE_TMP_SECONDS", "atomic_write_bytes", "atomic_write_text", "current_umask"]

# A temporary file of ours older than this was left by a writer that was killed: remove it.
STALE_TMP_SECONDS = 600


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk; not every OS lets us
    # open a directory (Windows), where the rename itself is the best we can do.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it where the OS tells it (Linux: the
    ``Umask:`` line of /proc/self/status); elsewhere set and restored at once (racy only
    against another thread creating a file in between)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_stale_tmp(directory: Path, name: str) -> None:
    now = time.time()
    for tmp in directory.glob(f".{name}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                tmp.unlink()


def _atomic_replace(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, rename it to ``path``."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(directory, path.name)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp creates 0o600 (and some writers re-create the file): the file it becomes is
        # an ordinary one.
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (temporary file, fsync, rename, fsync dir)."""
    _atomic_replace(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
