"""One writer per data directory: a running node, or an offline `config update`/`rollback`.

A node's data directory holds its config history, keys, signed votes and task store, and
the node reads them once at start and keeps them in memory: a second process writing
there while it runs is not seen by it. An offline `config update --file` against a
running node recorded a version the cluster never agreed, which the node took up
unannounced at its next restart; a second node on the same directory would vote with the
first one's key and overwrite its marks.

So the node holds an exclusive `flock` on `<data_dir>/node.lock` while it runs, and the
offline history commands take the same lock without waiting. `flock` belongs to the open
file: the kernel drops it when the holder closes the file or its process ends, crash or
SIGKILL included, so a stale lock file never blocks anyone. (Not on NFS, where `flock`
may be local to one machine: give each node a local data directory.)
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from butterfly.types.errors import ConfigError

LOCK_FILE = "node.lock"


class DataDirLocked(ConfigError):
    """Another process (a running node, or an offline history change) holds the lock."""


class DataDirLock:
    """The lock held on one data directory until `release` (or the process ends)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_data_dir(data_dir: Path, *, then: str) -> DataDirLock:
    """Take `data_dir`'s lock now or raise DataDirLocked, whose message names the holder's
    pid (written in the file by whoever holds it) and ends with `then`: what to do."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by child processes
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DataDirLocked(
            f"{data_dir} is in use by a running node (process {holder} holds {path}); {then}"
        ) from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return DataDirLock(path, fd)
