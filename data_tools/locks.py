"""One run per folder: an output_dir or a cache being written by one run stops a second one at once.

The lock is an advisory `flock` on `<folder>/.lock`, which also records who holds it (process id,
host, start time, command line) for the second run's message. The kernel drops the lock when its
process ends, however it ends, so a run killed with SIGKILL never blocks the next one; the file it
leaves behind holds no lock.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".lock"


class FolderBusy(RuntimeError):
    """Another live process holds the folder; the message names it."""


class FolderLock:
    """`with FolderLock(folder, "output_dir"):` holds `folder` for this process or raises FolderBusy."""

    def __init__(self, folder: str | os.PathLike, what: str):
        self.folder, self.what = Path(folder), what
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 65536, 0))
            os.close(fd)
            raise FolderBusy(f"{self.what} {self.folder} is in use by {holder}; wait for that run to end, stop it, "
                             f"or choose another {self.what}") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode())
        return f"process {info['pid']} on {info['host']} (started {info['started']}: {info['command']})"
    except (ValueError, KeyError, UnicodeDecodeError):
        return "another process"
