"""Cell folder locks: one process works on a cell folder at a time, across processes and Ray
workers; a lock dies with its holder (even by kill -9)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

_HELD: dict[Path, list] = {}
#: The lock file of a cell folder: held by ``cell_lock``, probed by ``cell_busy``.
LOCK_FILE = ".eebench.lock"


@contextlib.contextmanager
def cell_lock(d: Path, who: str = "") -> Iterator[None]:
    """Hold the lock of cell folder ``d`` (an OS lock on ``d/.eebench.lock``: released by the
    kernel when the holder dies, even by kill -9). A second process waits, saying so once.
    Re-entrant within one process."""
    from filelock import FileLock, Timeout

    key = d.resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    d.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(d / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"{who} waiting: another eebench process is working on {d} (lock {d / LOCK_FILE})".strip(),
              flush=True)
        lock.acquire()
    _HELD[key] = [lock, 1]
    try:
        yield
    finally:
        del _HELD[key]
        lock.release()


def cell_busy(d: Path) -> bool | None:
    """Whether another process holds the lock of cell folder ``d`` now (None: cannot tell on this
    platform). A non-blocking probe of the existing lock file, opened read-only: creates nothing."""
    try:
        import fcntl
    except ImportError:  # Windows: filelock uses msvcrt there
        return None
    path = d / LOCK_FILE
    if not path.exists():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def remove_temporaries(d: Path) -> None:
    """Delete the temporary files of atomic writes (``.<name>.<random>.tmp``) that a killed
    process left in a cell folder; call only while holding the cell's lock."""
    for p in d.rglob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)
