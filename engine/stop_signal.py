"""Stop cleanly on SIGTERM / SIGINT: save a checkpoint at the next step boundary, then return.

torchrun sends SIGTERM to every worker on an elastic restart or when one worker fails; Ctrl-C
sends SIGINT.  The handler only records the signal (``signum``); each optimizer step reads it with
the step's other flags, all-reduced (MAX) across ranks in the step's one host read
(``engine.step_guard.StepGuard.read``), so all ranks save the same step and leave together.  A
second signal gets the previous behaviour (SIGINT: KeyboardInterrupt, SIGTERM: termination) --
the save is atomic, so that is safe.
"""
from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Records SIGTERM / SIGINT while installed (``signum``: the last one, 0 for none)."""

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

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name if signum else ""
