"""The optional compiled student step (config key ``compile``, off by default).

``compile_student(model, device, setting)`` returns ``torch.compile(model, mode=...)``: the
student's forward, and through AOTAutograd its backward, run as Inductor-generated kernels (the
BatchNorm / PReLU / elementwise chains of a MobileFaceNet fused), which cuts the kernel launches
that bound a small student on a GPU.  Settings:

- ``False`` (default): the plain eager network.
- ``True`` or ``"default"``: Inductor, no CUDA graphs -- the safe choice on any device, with DDP.
- ``"reduce-overhead"``: Inductor + CUDA graphs (the whole step's launches replayed at once; the
  shapes are static: a fixed batch, the loader drops the last incomplete one).  CUDA only: on
  another device the run compiles with ``"default"`` and says so.  Each forward is marked as a new
  CUDA-graph step (``torch.compiler.cudagraph_mark_step_begin``), so one micro-batch's outputs
  are never overwritten while its backward still needs them.
- ``"max-autotune-no-cudagraphs"`` / ``"max-autotune"``: Inductor with kernel autotuning (slow to
  compile: minutes), the latter with CUDA graphs (CUDA only, as above).

The compiled module shares the student's parameters and buffers; the trainer saves
``run.student.state_dict()`` -- the bare network, never the ``_orig_mod.``-prefixed state of the
compiled wrapper -- so checkpoints of compiled and plain runs are interchangeable (resume either
way).  The first steps of a compiled run are slow (tracing and code generation; the kernels are
cached on disk, ``TORCHINDUCTOR_CACHE_DIR``).  Inductor on a CPU needs a C++ compiler (gcc).
"""
from __future__ import annotations

import logging
from typing import Union

import torch
from torch import nn

from plugins.config_defaults import COMPILE_MODES

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_mode(setting: Union[bool, str], device_type: str) -> str:
    """The ``torch.compile`` mode of config value ``setting`` on ``device_type`` ('' = off).

    Raises:
        ValueError: ``setting`` is neither a bool nor one of ``COMPILE_MODES``.
    """
    if setting is False or setting is None:
        return ""
    if setting is True:
        return "default"
    if setting not in COMPILE_MODES:
        raise ValueError(f"config key 'compile' must be False, True or one of "
                         f"{list(COMPILE_MODES)}, got {setting!r}")
    if setting in CUDA_GRAPH_MODES and device_type != "cuda":
        return "default" if setting == "reduce-overhead" else "max-autotune-no-cudagraphs"
    return setting


def _mark_cuda_graph_step(module: nn.Module, args) -> None:
    torch.compiler.cudagraph_mark_step_begin()


def compile_student(model: nn.Module, device: torch.device, setting: Union[bool, str],
                    log: logging.Logger = None) -> nn.Module:
    """``model`` compiled as config key ``compile`` asks (``model`` itself when off).  ``model``
    is the student as the trainer calls it (DDP-wrapped when world > 1: torch.compile then splits
    the graph at DDP's gradient buckets)."""
    mode = compile_mode(setting, torch.device(device).type)
    if not mode:
        return model
    if log is not None:
        asked = "" if mode == setting or setting is True else f" ({setting!r} needs CUDA)"
        log.info("compile: torch.compile(student, mode=%r)%s; the first steps trace and "
                 "generate code", mode, asked)
    compiled = torch.compile(model, mode=mode)
    if mode in CUDA_GRAPH_MODES:
        compiled.register_forward_pre_hook(_mark_cuda_graph_step)
    return compiled
