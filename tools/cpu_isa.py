"""The CPU instruction set of a run's kernels, pinned for reproducible numbers (the demo and the
distillation benchmark).

torch's own kernels (ATen), oneDNN's convolutions and MKL's matrix products each take the widest
instruction set the CPU offers, and AVX-512 kernels sum in another order than AVX2 ones: on one
machine the demo's TAR@FAR=1e-3 moved by up to 9.67 points between the two (README, "Numbers and
the CPU").  The variables are read when a process first uses the kernels, so they are set around
the start of the worker processes (``pinned_environment``), which inherit them.

``ISA_PINS["avx2"]`` (the default of both tools) runs the AVX2 kernels on AVX2 and AVX-512 machines
alike; ``"native"`` leaves the choice to each library.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping

ISA_PINS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                     "MKL_CBWR": "AVX2"},
            "native": {}}


@contextlib.contextmanager
def pinned_environment(pins: Mapping[str, str]) -> Iterator[None]:
    """Set the environment variables ``pins`` while the block runs (the processes started in it
    inherit them), then put back what was there."""
    saved = {key: os.environ.get(key) for key in pins}
    os.environ.update(pins)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
