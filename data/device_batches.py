"""Training batches on the device, one batch ahead of the step, and whether the loader keeps up.

``DeviceBatches`` wraps the training DataLoader (``(images, labels, index, flipped)`` host
batches, pinned where an accelerator exists) and yields ``(images, labels, index, flipped)``
with ``images`` ``[B, 3, S, S]`` float32 and ``labels`` ``[B]`` int64 on the device, ``images``
in the run's memory format (channels_last on GPUs), and ``index`` / ``flipped`` ``[B]`` left on
the host, where the teacher-embedding cache reads them (a trip to the GPU and back would stall
every step).

On CUDA, when batch ``k`` is handed out, batch ``k + 1`` has already been taken from the loader
and its copy queued on a side stream (``non_blocking`` from pinned memory), so the copy overlaps
step ``k`` instead of delaying step ``k + 1``.  The step's stream waits for the side stream
before it gets a batch, and ``record_stream`` tells the caching allocator that the batch is used
on the step's stream.  A ``uint8`` batch (``FaceRecordDataset(pixels="uint8")``: ``[B, S, S,
3]`` bytes, a quarter of the floats to pin and copy) is normalised there by
``data.pixels.normalise_batch``: the same bits as normalising on the host.  On a CPU the batches
pass through (a ``uint8`` batch is normalised on the host).

Whether the loader or the step limits a run is measured, not guessed: ``DeviceBatches`` times
how long it waits for the loader and how long the step takes between two batches, over batches
``skip + 1 .. skip + window`` of the run (the first ones include the workers' start), and logs it
once.  This costs two clock reads per batch and changes nothing that is trained (a batch
prefetched beyond the last trained one is dropped; the trainer positions the sampler from the
samples it trained, at every epoch and resume).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Iterator, Optional, Tuple

import torch

from data.pixels import device_table, normalise_batch

LOG = logging.getLogger(__name__)

Batch = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
LIMIT_FRACTION = 0.10       # waiting more than this share of the time: the loader limits the run


def host_pixels(device: torch.device) -> str:
    """``FaceRecordDataset(pixels=...)`` for training on ``device``: ``"uint8"`` on an
    accelerator (normalised there), ``"float"`` on a CPU (normalised in the loader workers)."""
    return "float" if torch.device(device).type == "cpu" else "uint8"


def to_device(batch: Batch, device: torch.device,
              memory_format: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
    """``(images, labels)`` of a host batch on ``device`` (non-blocking copies), a uint8 batch
    normalised, ``images`` in ``memory_format``; ``index`` and ``flipped`` stay on the host."""
    images, labels, index, flipped = batch
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = normalise_batch(images)
    return memory_format(images), labels.to(device, non_blocking=True), index, flipped


class LoaderWaitMeter:
    """Wait for the loader vs time per batch, over batches ``skip + 1 .. skip + window``.

    Args:
        num_workers: the loader's workers (named in the report).
        batch_size: images per batch (for the images/s of the report).
        skip: batches left out at the start (worker start-up, first-step compilation).
        window: batches measured; the report is logged once after them.
        log: log the report (rank 0); otherwise only measure.
    """

    def __init__(self, num_workers: int, batch_size: int, skip: int = 5, window: int = 20,
                 log: bool = True) -> None:
        self.num_workers, self.batch_size = num_workers, batch_size
        self.skip, self.window, self.log = skip, window, log
        self.batches, self.waited, self.elapsed = 0, 0.0, 0.0
        self.report: Optional[str] = None

    @property
    def done(self) -> bool:
        return self.report is not None

    def add(self, waited: float, elapsed: float) -> None:
        """One batch: ``waited`` seconds blocked on the loader within ``elapsed`` seconds since
        the previous batch was handed out."""
        self.batches += 1
        if self.done or self.batches <= self.skip:
            return
        self.waited += waited
        self.elapsed += elapsed
        if self.batches == self.skip + self.window:
            self.report = self._report()
            if self.log:
                limits = self.waited > LIMIT_FRACTION * self.elapsed
                (LOG.warning if limits else LOG.info)(self.report)

    def _report(self) -> str:
        n = self.window
        wait_ms, step_ms = 1e3 * self.waited / n, 1e3 * self.elapsed / n
        share = self.waited / max(self.elapsed, 1e-12)
        rate = n * self.batch_size / max(self.elapsed, 1e-12)
        head = (f"loader: waited {wait_ms:.1f} ms for data per batch, {100 * share:.0f}% of the "
                f"{step_ms:.1f} ms between batches (batches {self.skip + 1}-{self.skip + n}, "
                f"{rate:.0f} images/s, {self.num_workers} "
                f"worker{'' if self.num_workers == 1 else 's'})")
        if share > LIMIT_FRACTION:
            return (f"{head}: the loader limits this run; raise num_workers (or 'auto'), check "
                    f"the storage of rec, and see bench/bench_dataset.py for its capacity")
        return f"{head}: the loader keeps up, the training step sets the pace"


class DeviceBatches:
    """The training batches of ``loader`` on ``device``, one batch ahead (see the module).

    Args:
        loader: yields host batches ``(images [B, 3, S, S] float32 or [B, S, S, 3] uint8,
            labels [B], index [B], flipped [B])``; iterated anew by each ``iter()`` (an epoch).
        device: the training device.
        memory_format: applied to each device batch of images (the run's precision plan).
        meter: the loader-wait measurement (None: not measured).
        clock: seconds (``time.perf_counter``; a test passes its own).
    """

    def __init__(self, loader: Iterable[Batch], device: torch.device,
                 memory_format: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
                 meter: Optional[LoaderWaitMeter] = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.loader, self.device = loader, torch.device(device)
        self.memory_format, self.meter, self.clock = memory_format, meter, clock
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.stream = torch.cuda.Stream(self.device)
            device_table(self.device)       # made on the current stream, before any copy

    def _fetch(self, batches: Iterator[Batch]) -> Tuple[Optional[Batch], float]:
        """The next batch on the device (copies queued on the side stream on CUDA) and the
        seconds spent waiting for the loader; None at the end of the loader."""
        start = self.clock()
        try:
            host = next(batches)
        except StopIteration:
            return None, self.clock() - start
        waited = self.clock() - start
        if not self.cuda:
            return to_device(host, self.device, self.memory_format), waited
        with torch.cuda.stream(self.stream):
            return to_device(host, self.device, self.memory_format), waited

    def _hand_over(self, batch: Batch) -> Batch:
        """On CUDA: the step's stream waits for the side stream's copies, and the allocator
        learns that the batch's memory is used on the step's stream."""
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            batch[0].record_stream(current)
            batch[1].record_stream(current)
        return batch

    def __iter__(self) -> Iterator[Batch]:
        if self.cuda:   # the side stream starts after everything queued so far (the table)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        batches = iter(self.loader)
        upcoming, _ = self._fetch(batches)
        handed = None                     # when the previous batch was handed out
        while upcoming is not None:
            current = self._hand_over(upcoming)
            upcoming, waited = self._fetch(batches)    # batch k + 1 while step k runs
            now = self.clock()
            if self.meter is not None and handed is not None:
                self.meter.add(waited, now - handed)     # step k - 1 and this wait
            handed = now
            yield current
