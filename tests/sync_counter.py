"""Count the host-device synchronisations a piece of training code asks for, on a CPU.

On a GPU, reading a device value on the host (``.item()``, ``bool(t)``, ``float(t)``,
``int(t)``, ``.tolist()``, ``.cpu()``), an operation whose output size depends on device data
(``nonzero``, ``unique``, ``masked_select``, indexing with a boolean mask, one-argument
``torch.where``, ``repeat_interleave`` with tensor repeats) and a blocking copy of host data to the
device (``torch.tensor(..., device=...)``) all make the CPU wait until the GPU has finished
everything queued before.  A CPU has no such wait, so this counter patches those Python entry
points and counts the calls made while a counted function runs (``SyncCounter.watch``), with the
call site (file:line of the first frame outside torch and this module) of each.  ``.numpy()``
is not counted: it refuses a GPU tensor, so a device value reaches it only through ``.cpu()``.

Calls on tensors that stay on the host by design (the loader's ``index`` / ``flipped`` the teacher
cache reads where the loader made them) are not syncs on a GPU either: ``host(*tensors)``
registers their storages, and calls on tensors sharing one of those storages are not counted.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import os
import traceback
from typing import Callable, Dict, Iterator, List

import torch

TENSOR_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu",
                  "nonzero", "unique", "masked_select")
TORCH_FUNCTIONS = ("nonzero", "unique", "masked_select", "equal", "allclose", "is_nonzero")
_HERE = os.path.abspath(__file__)
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


def _is_mask(index) -> bool:
    if isinstance(index, tuple):
        return any(_is_mask(i) for i in index)
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


class SyncCounter:
    """Patch the sync points while installed; count per category of the innermost watched
    function (``watch(module, name, category)``; category None: not counted inside it)."""

    def __init__(self) -> None:
        self.counts: Dict[str, int] = collections.Counter()
        self.sites: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.calls: Dict[str, int] = collections.Counter()
        self._stack: List[str | None] = []
        self._host_storages: set = set()
        self._host_alive: List[torch.Tensor] = []
        self._busy = False
        self._depth = 0
        self._undo: List[Callable[[], None]] = []

    # ------------------------------------------------------------------ what is counted
    def host(self, *tensors: torch.Tensor) -> None:
        """Storages that stay on the host on a GPU too (calls on them are not syncs)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._host_storages.add(t.untyped_storage().data_ptr())
                self._host_alive.append(t)     # a freed storage's address could be reused

    def _on_host(self, args) -> bool:
        first = args[0] if args else None
        return isinstance(first, torch.Tensor) and first.device.type == "cpu" and \
            first.untyped_storage().data_ptr() in self._host_storages

    def _record(self, what: str, args) -> None:
        if self._busy or not self._stack or self._stack[-1] is None or self._on_host(args):
            return
        self._busy = True
        try:
            category = self._stack[-1]
            self.counts[category] += 1
            self.sites[category][f"{self._site()} {what}"] += 1
        finally:
            self._busy = False

    @staticmethod
    def _site() -> str:
        for frame in reversed(traceback.extract_stack()[:-3]):
            path = os.path.abspath(frame.filename)
            if path != _HERE and not path.startswith(_TORCH):
                return f"{os.path.relpath(path)}:{frame.lineno} ({frame.name})"
        return "?"

    # ------------------------------------------------------------------ patching
    def _patch(self, owner, name: str, check: Callable = None) -> None:
        real = getattr(owner, name)

        @functools.wraps(real)
        def counted(*args, **kwargs):
            if self._depth == 0 and (check is None or check(args, kwargs)):
                self._record(name, args)
            self._depth += 1          # a counted call made by another (unique -> unique) is one
            try:
                return real(*args, **kwargs)
            finally:
                self._depth -= 1
        setattr(owner, name, counted)
        self._undo.append(lambda: setattr(owner, name, real))

    def install(self) -> "SyncCounter":
        for name in TENSOR_METHODS:
            self._patch(torch.Tensor, name)
        for name in TORCH_FUNCTIONS:
            self._patch(torch, name)
        self._patch(torch.Tensor, "__getitem__", lambda a, k: _is_mask(a[1]))
        self._patch(torch.Tensor, "__setitem__", lambda a, k: _is_mask(a[1]))
        self._patch(torch, "where", lambda a, k: len(a) + len(k) == 1)
        repeats = lambda a, k: isinstance(k.get("repeats", a[1] if len(a) > 1 else None),  # noqa
                                          torch.Tensor) and "output_size" not in k
        self._patch(torch.Tensor, "repeat_interleave", repeats)
        self._patch(torch, "repeat_interleave", repeats)
        self._patch(torch, "tensor", lambda a, k: k.get("device") is not None)
        self._patch(torch, "as_tensor", lambda a, k: k.get("device") is not None)
        return self

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    def watch(self, owner, name: str, category: str | None) -> None:
        """Count the calls made while ``owner.name`` runs under ``category`` (innermost wins)."""
        real = getattr(owner, name)

        @functools.wraps(real)
        def watched(*args, **kwargs):
            self._stack.append(category)
            self.calls[category] += 1
            try:
                return real(*args, **kwargs)
            finally:
                self._stack.pop()
        setattr(owner, name, watched)
        self._undo.append(lambda: setattr(owner, name, real))

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Nothing in the block is counted (e.g. the data loader, which works on the host)."""
        self._stack.append(None)
        try:
            yield
        finally:
            self._stack.pop()

    def watch_loader(self, owner, name: str) -> None:
        """``owner.name`` (a loader factory such as ``data.dataset.make_loader``) returns its
        loader wrapped by ``host_loader``; building it is not counted."""
        real = getattr(owner, name)

        @functools.wraps(real)
        def made(*args, **kwargs):
            with self.excluded():
                loader = real(*args, **kwargs)
            return self.host_loader(loader)
        setattr(owner, name, made)
        self._undo.append(lambda: setattr(owner, name, real))

    def host_loader(self, loader):
        """``loader`` wrapped: its batches are made uncounted, and their ``index`` / ``flipped``
        (which stay on the host) are registered with ``host``."""
        counter = self

        class HostLoader:
            def __len__(self):
                return len(loader)

            def __iter__(self):
                with counter.excluded():
                    iterator = iter(loader)
                while True:
                    with counter.excluded():
                        try:
                            batch = next(iterator)
                        except StopIteration:
                            return
                    counter.host(batch[2], batch[3])
                    yield batch
        return HostLoader()

    def report(self) -> str:
        lines = []
        for category, sites in self.sites.items():
            lines.append(f"{category}: {self.counts[category]} syncs in {self.calls[category]} "
                         f"calls")
            lines += [f"    {n:5d}  {site}" for site, n in sites.most_common()]
        return "\n".join(lines)


@contextlib.contextmanager
def counting() -> Iterator[SyncCounter]:
    counter = SyncCounter().install()
    try:
        yield counter
    finally:
        counter.uninstall()
