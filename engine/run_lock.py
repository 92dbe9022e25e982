"""One run per output folder: an advisory ``fcntl.flock`` on ``<output>/.lock``.

The kernel drops the lock when the holding process exits or dies (SIGKILL, OOM, power loss of a
local disk), so a crashed run never blocks its own ``--resume``; a second live run on the same
folder is refused with the holder's pid and host.  Where ``fcntl`` is missing (Windows) the lock
is skipped with a warning.  Like every advisory lock it protects only against programs that take
it, and network file systems may not honour ``flock``.
"""
from __future__ import annotations

import logging
import os
import socket
import time

try:
    import fcntl
except ImportError:                      # pragma: no cover - Windows
    fcntl = None

LOG = logging.getLogger("train_distill")


class OutputLock:
    """Exclusive advisory lock of a run's output folder.

    Args:
        output: the run's output folder (created if missing).
    """

    def __init__(self, output: str) -> None:
        self.output = output
        self.path = os.path.join(output, ".lock")
        self.fd = None

    def acquire(self) -> None:
        """Take the lock or raise RuntimeError naming the process that holds it."""
        if fcntl is None:
            LOG.warning("no fcntl on this platform: %s is not locked against a second run",
                        self.output)
            return
        os.makedirs(self.output, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "pid unknown"
            os.close(fd)
            raise RuntimeError(f"{self.output} is in use by another run ({holder}): wait for it "
                               f"to finish or set another config.output; the lock is released "
                               f"as soon as that process ends") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
