"""Stop cleanly on SIGTERM / SIGINT: save a checkpoint at the next step boundary, then return.

torchrun sends SIGTERM to every worker on an elastic restart or when one worker fails; Ctrl-C
sends SIGINT.  The handler only records the signal; the training loop asks ``requested()`` after
each optimizer step, and the ranks agree through one all-reduce (MAX) of the flag, so all of them
save the same step and leave together.  A second signal gets the previous behaviour (SIGINT:
KeyboardInterrupt, SIGTERM: termination) -- the save is atomic, so that is safe.
"""
from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Records SIGTERM / SIGINT while installed; ``requested`` answers for all ranks."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return                       # signal handlers can only be set from the main thread
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def requested(self, device: torch.device) -> int:
        """The signal number any rank received (0: none).  Collective when world size > 1."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.signum
        flag = torch.tensor([self.signum], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name if signum else ""
