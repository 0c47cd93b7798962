"""Named fault points, so tests can make the real code meet a real fault at an exact place.

Code that writes, signals or waits calls `fault_point("checkpoint_write")` where a fault would hurt.
Normally that is a dictionary lookup and nothing happens. With the environment variable
`LDM_TUNE_FAULTS="point=action[@n][/rank],..."` the n-th time (default: the first) the point is
reached, in the process of that global rank only when one is given (else in every process), the
action happens there: a signal sent to this process (`sigterm`, `sigint`, `sigkill`, `sigint2`:
SIGINT twice, `sigstop`: the process stalls, as a hung machine does) or an OSError raised as a failing write would raise it (`enospc`: no space left,
`erofs`: read-only file system, `eacces`: permission denied). The signal is a real one: the
process's own handlers meet it exactly as they would meet one from SLURM, Kubernetes or a
keyboard. tests/test_faults.py runs the fault matrix this way.
"""
from __future__ import annotations

import errno
import os
import signal
import time

ENV = "LDM_TUNE_FAULTS"
_ERRORS = {"enospc": errno.ENOSPC, "erofs": errno.EROFS, "eacces": errno.EACCES}
_SIGNALS = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sigkill": signal.SIGKILL, "sigstop": signal.SIGSTOP}

_plan: dict[str, tuple[str, int]] | None = None
_hits: dict[str, int] = {}


def _load() -> dict[str, tuple[str, int]]:
    plan = {}
    for item in filter(None, (s.strip() for s in os.environ.get(ENV, "").split(","))):
        point, _, action = item.partition("=")
        action, _, rank = action.partition("/")
        action, _, nth = action.partition("@")
        if action not in _ERRORS and action not in _SIGNALS and action != "sigint2":
            raise ValueError(f"{ENV}: unknown action {action!r} in {item!r}")
        if not rank or rank == os.environ.get("RANK", "0"):
            plan[point] = (action, int(nth or 1))
    return plan


def fault_point(name: str, path: str | os.PathLike | None = None) -> None:
    """Meet the fault planned for `name`, if any (see the module's docstring). `path`: what is
    being written there, for the OSError's message."""
    global _plan
    if _plan is None:
        _plan = _load()
    if name not in _plan:
        return
    action, nth = _plan[name]
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != nth:
        return
    if action in _ERRORS:
        code = _ERRORS[action]
        raise OSError(code, os.strerror(code), str(path) if path is not None else None)
    for _ in range(2 if action == "sigint2" else 1):
        os.kill(os.getpid(), _SIGNALS.get(action, signal.SIGINT))
        time.sleep(0.05)  # Python runs a handler between bytecodes: let it run before the next one
