"""Preemption: SIGTERM and Ctrl-C end a run with a checkpoint, not with lost steps.

SLURM and Kubernetes send SIGTERM (then, after a grace period, SIGKILL); a user presses Ctrl-C.
While the cache is built, the first signal stops at once: the cache keeps every finished shard and
the next run goes on from there. During the steps it asks the loop to finish the optimizer step in
progress (and a checkpoint or validation already under way), write a checkpoint and exit with
EXIT_RESUME; every process of the run agrees on it at the step's end, so all of them stop after the
same step. A second signal stops at once: whatever was being written is left as a temporary
file or folder that nothing reads and the next run clears, so the last complete checkpoint stays
the one to resume from.
"""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

#: the exit status of a run that stopped on a signal after writing what it needs to continue
#: (75 is EX_TEMPFAIL: "try again later"); resume it with train.resume=latest
EXIT_RESUME = 75


class Interrupted(Exception):
    """The run stopped on a signal; everything needed to continue is on disk."""


class Interrupts:
    """Catches SIGTERM and SIGINT for the duration of a `with` block (main thread only)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None  # the first signal's number
        self.immediate = True  # stop at once (the cache build) or at the step's end (the steps)
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            raise KeyboardInterrupt(f"a second signal ({name}): stopped at once")
        self.received = signum
        if self.immediate:
            raise Interrupted(f"{name} received")
        log.warning("%s received: finishing this step, then writing a checkpoint (send it again to stop at once)", name)
