"""The run directory: a fresh name of its own, one process writing it, no run silently replaced.

* A default name (``runs/<model>-<data>-<time>``) is claimed with ``os.mkdir`` (which fails
  if the name exists), trying ``-2``, ``-3``, ... after it: runs started in the same second
  never share a directory (:func:`create_unique`).
* A directory holding a run (any of :data:`RUN_MARKERS`, finished or not) is refused unless
  the run is resumed or ``--overwrite`` is given; then the files a run writes
  (:data:`RUN_FILES`, TensorBoard events, leftover temporary files) are removed and nothing
  else: what the user put there stays (:func:`check_target`, :func:`clear_run`).
* A run directory belongs to one process (rank 0) for the run's life: an exclusive
  ``fcntl.flock`` on ``RUN_DIR/.lock`` (:class:`RunLock`). The kernel drops the lock when its
  process ends, however it ends, so the file a killed run leaves behind never blocks the next.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from cnnkit.train.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from cnnkit.train.divergence import DIVERGED_NAME
from cnnkit.train.history import CSV_NAME, JSONL_NAME
from cnnkit.train.outputs import METRICS_NAME
from cnnkit.train.report import CURVES_NAME, REPORT_NAME
from cnnkit.train.state import CHECKPOINT_NAME

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a second writer is not detected there
    fcntl = None

LOCK_NAME = ".lock"
# What `cnnkit evaluate` writes into a run directory.
EVALUATION_NAME = "evaluation.json"
CONFUSION_NAME = "confusion_matrix.png"
# Any of these makes a directory a run directory (a finished or an interrupted run).
RUN_MARKERS = (CONFIG_NAME, JSONL_NAME, CHECKPOINT_NAME, METRICS_NAME)
# What a run's end (and `cnnkit evaluate`) writes: stale once a resumed run trains further.
RESULT_FILES = (METRICS_NAME, REPORT_NAME, EVALUATION_NAME, CONFUSION_NAME, DIVERGED_NAME)
# Every file a run (and `cnnkit evaluate` on it) writes; --overwrite removes these only.
RUN_FILES = tuple(dict.fromkeys((*RUN_MARKERS, WEIGHTS_NAME, CSV_NAME, CURVES_NAME, *RESULT_FILES)))
TENSORBOARD_GLOB = "events.out.tfevents.*"


def run_markers(path: Path) -> list[str]:
    """The names of :data:`RUN_MARKERS` present in ``path``."""
    return [name for name in RUN_MARKERS if (path / name).exists()]


def run_directory(path: str | os.PathLike, *, require_run: bool = True) -> Path:
    """``path`` as a run directory; ValueError naming it when it is missing, not a directory,
    or (``require_run``) holds no run (none of :data:`RUN_MARKERS`)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such run directory")
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory (expected a run directory)")
    if require_run and not run_markers(path):
        raise ValueError(f"{path}: not a run directory (no {CONFIG_NAME} or {JSONL_NAME})")
    return path


# Files in a run directory no picture written beside it may replace: the run's own, its lock,
# a detection run's results.
PROTECTED_FILES = frozenset({*RUN_FILES, LOCK_NAME, "detections.json"})


def check_png_out(out: Path, *, refuse_run_dirs: bool) -> None:
    """ValueError naming ``--out`` unless a new PNG may be written there: not a directory, a
    ``.png`` name, in an existing directory, and not a run directory's own file
    (:data:`PROTECTED_FILES`; any file there when ``refuse_run_dirs``)."""
    if out.is_dir():
        raise ValueError(f"--out {out}: is a directory; give a .png file name")
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: the picture is a PNG; give a name ending in .png")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: no such directory {out.parent}")
    found = run_markers(out.parent)
    if found and (refuse_run_dirs or out.name in PROTECTED_FILES):
        raise ValueError(
            f"--out {out} is in the run directory {out.parent} ({', '.join(found)}); write the "
            "picture elsewhere"
        )


def check_target(path: Path, *, overwrite: bool) -> None:
    """ValueError when ``path`` cannot receive a new run: it is a file, or it holds a run and
    ``overwrite`` is false. Reads only; an empty or missing directory is fine."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is not a directory")
    found = run_markers(path) if path.is_dir() else []
    if found and not overwrite:
        raise ValueError(
            f"--out {path} already holds a run ({', '.join(found)}); pass --overwrite to "
            f"replace it, --resume {path} to continue it, or another --out"
        )


def clear_run(path: Path) -> None:
    """Remove the files a run writes from ``path`` (:data:`RUN_FILES`, TensorBoard events and
    temporary files of atomic writes); anything else stays."""
    doomed = [path / name for name in RUN_FILES]
    doomed += path.glob(TENSORBOARD_GLOB)
    for name in RUN_FILES:
        doomed += path.glob(f".{name}.*.tmp")
    for file in doomed:
        with contextlib.suppress(FileNotFoundError):
            file.unlink()


def create_unique(base: Path, attempts: int = 1000) -> Path:
    """Create and return ``base``, or ``base-2``, ``base-3``, ... if taken (``os.mkdir``
    creates a name or fails atomically, so two processes never get the same one)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, attempts + 1):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        return candidate
    raise ValueError(f"no free run directory name after {base} ... -{attempts}; pass --out")


# `cnnkit runs` / `compare` probe a run's state with a shared lock held for microseconds; a
# trainer starting at that instant retries instead of calling the directory in use.
LOCK_RETRIES = 10
LOCK_RETRY_SECONDS = 0.02


def _lock_exclusive(fd: int) -> None:
    """``flock(LOCK_EX | LOCK_NB)``, retried briefly; BlockingIOError when still held."""
    for attempt in range(LOCK_RETRIES + 1):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == LOCK_RETRIES:
                raise
            time.sleep(LOCK_RETRY_SECONDS)


class RunLock:
    """An exclusive lock on ``run_dir`` held until :meth:`release` or the process ends.

    Raises:
        ValueError: another process holds it (naming the directory and that process's id).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None
        if fcntl is None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            _lock_exclusive(fd)
        except BlockingIOError:
            owner = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            pid = f"pid {owner}" if owner.isdigit() else "another process"
            raise ValueError(
                f"run directory {run_dir} is in use: {pid} is training into it (it holds "
                f"{self.path}); wait for it to end or pass another --out"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd

    def release(self) -> None:
        """Unlock (closing the descriptor drops the lock; the file stays, harmlessly)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def claim(path: Path, *, fresh: bool, overwrite: bool, resuming: bool) -> tuple[Path, RunLock]:
    """Create (``fresh``: under a unique name from ``path``) and lock the run directory;
    unless ``resuming``, refuse one that holds a run, or clear it when ``overwrite``.
    Returns the directory and its lock."""
    if fresh:
        path = create_unique(path)
    else:
        if not resuming:
            check_target(path, overwrite=overwrite)
        path.mkdir(parents=True, exist_ok=True)
    lock = RunLock(path)
    try:
        if not resuming:
            # Again under the lock: another process may have written a run meanwhile.
            check_target(path, overwrite=overwrite)
            if overwrite:
                clear_run(path)
    except BaseException:
        lock.release()
        raise
    return path, lock


def continue_run(path: Path, train: dict, training_left: bool) -> None:
    """A resumed run's directory brought up to date: config.json's ``train`` section replaced by
    ``train`` (the arguments changed on resume, e.g. ``--epochs``), and the results of its
    earlier end (:data:`RESULT_FILES`) removed when it trains further."""
    from cnnkit.atomic import atomic_write_text
    from cnnkit.train.checkpoint import CONFIG_NAME, read_config

    if (path / CONFIG_NAME).is_file():
        config = read_config(path)
        config["train"] = train
        atomic_write_text(path / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    if training_left:
        for name in RESULT_FILES:
            with contextlib.suppress(FileNotFoundError):
                (path / name).unlink()
