"""Before writing gigabytes, check they fit: a run that cannot finish its cache, a checkpoint and its
exports stops at once, saying how much it needs and where, instead of failing hours later."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

MARGIN = 1.1  # file headers, JSON, and what the estimate leaves out


class NotEnoughSpace(OSError):
    """The free space under a folder is less than what is about to be written there."""


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def ensure_free_space(folder: str | os.PathLike, need: float, what: str) -> None:
    """Raise NotEnoughSpace (an ENOSPC OSError) if `folder`'s file system has less than `need` bytes
    (times MARGIN) free for `what`."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():  # the folder may not exist yet: its file system is its nearest parent's
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = need * MARGIN
    if need > free:
        raise NotEnoughSpace(errno.ENOSPC, f"{what} needs about {gib(need)} in {folder}, which has {gib(free)} free: "
                             "free some space or point it elsewhere", str(folder))
