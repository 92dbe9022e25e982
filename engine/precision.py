"""Mixed precision and memory format of a training run, chosen by what the device can do.

One plan per run, so that the CUDA recipe and its CPU test execute the same lines::

    plan = precision_plan(device, cfg)                  # config keys fp16, amp_dtype, channels_last
    student = resolve_model(name, fp16=plan.backbone_fp16)
    student = plan.memory_format(student); images = plan.memory_format(images)
    scaler = plan.grad_scaler()                          # GradScaler(device type), on for float16
    ...
    found_inf = unscale_gradients(scaler, optimizer)     # device flag, no host read
    ...one host read of all the step's flags (engine/step_guard), every rank agreeing...
    step_scaled(scaler, optimizer, overflow, agreed_found_inf)   # or drop_scaled_step

``fp16 = True`` (arcface_torch's flag) runs the student's convolutional trunk under autocast and
its embedding head in fp32.  The autocast dtype is ``amp_dtype``:

- ``"auto"``: the device's half type (``plugins.backbones._common.default_autocast_dtype``):
  float16 with a GradScaler on GPUs; bfloat16 without a scaler on a CPU (bfloat16 has fp32's
  exponent range, and CPU float16 kernels are slow) -- what a real CPU run should use;
- ``"float16"``: float16 with a GradScaler on any device, the CPU included (torch >= 2.3 has
  float16 autocast and ``GradScaler("cpu")``): the tests and ``bench/gpu_acceptance.py --device
  cpu`` use it to run the CUDA recipe's lines on a CPU;
- ``"bfloat16"``: bfloat16, no scaler (e.g. on Ampere and newer GPUs).

The teacher follows ``teacher_fp16`` with the same ``amp_dtype``, except that ``"auto"`` keeps a
CPU teacher in fp32 (its embeddings are the distillation target; see ``plugins/teacher.py``).

``channels_last``: None (auto) = on GPUs only; True / False force it (CPU convolutions support it).

GradScaler's skip decision is made per rank from that rank's gradients.  The student's gradients
are all-reduced by DDP, so their infs reach every rank, but the head's class shards are outside
DDP: an overflow in one rank's shard would make only that rank skip the step and halve its scale,
and the ranks would drift apart.  The trainer all-reduces the found-inf flag with the step's other
flags (``engine.step_guard.StepGuard.read``) and hands the agreed flag to ``step_scaled``, so
every rank skips (or steps) together and keeps the same scale.  ``GradScaler.step`` itself reads
the flag with ``.item()`` (a host-device synchronisation); ``step_scaled`` decides from the flag
the trainer has already read, with GradScaler's own unscale and update (its state_dict, hence the
checkpoints, unchanged).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch
from torch import nn

from plugins.backbones._common import default_autocast_dtype

from plugins.builders import AMP_DTYPES  # config key amp_dtype -> autocast dtype


@dataclass(frozen=True)
class PrecisionPlan:
    """What a run does about precision and memory format on its device.

    Attributes:
        device_type: ``"cuda"``, ``"cpu"``, ...
        autocast_dtype: the student trunk's autocast dtype; None = fp32.
        teacher_dtype: the dtype passed to the teacher (``TeacherHook(autocast_dtype=...)``):
            None = the teacher's own rule (float16 on GPUs, fp32 on CPU) when teacher_fp16.
        channels_last: student weights and input batches in channels_last.
    """

    device_type: str
    autocast_dtype: Optional[torch.dtype]
    teacher_dtype: Optional[torch.dtype]
    channels_last: bool

    @property
    def use_scaler(self) -> bool:
        """float16 needs loss scaling (5-bit exponent); bfloat16 and fp32 do not."""
        return self.autocast_dtype == torch.float16

    @property
    def backbone_fp16(self) -> Union[bool, torch.dtype]:
        """The ``fp16`` argument of ``get_model``: True where the backbone's own rule gives the
        planned dtype (so a fork's backbones get the bool they expect), else the dtype itself."""
        if self.autocast_dtype is None:
            return False
        if self.autocast_dtype == default_autocast_dtype(self.device_type):
            return True
        return self.autocast_dtype

    def grad_scaler(self, **options) -> torch.amp.GradScaler:
        """``GradScaler(device_type, **options)`` (e.g. init_scale), enabled for float16 only."""
        return torch.amp.GradScaler(self.device_type, enabled=self.use_scaler, **options)

    def memory_format(self, x: Union[nn.Module, torch.Tensor]) -> Union[nn.Module, torch.Tensor]:
        """A module or a 4-d batch ``[B, C, H, W]`` in channels_last when planned (else as is)."""
        if not self.channels_last:
            return x
        if isinstance(x, nn.Module):
            return x.to(memory_format=torch.channels_last)
        return x.contiguous(memory_format=torch.channels_last)

    def describe(self) -> str:
        name = {None: "fp32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
        return (f"precision: student trunk {name.get(self.autocast_dtype, self.autocast_dtype)}"
                f"{' + GradScaler(' + repr(self.device_type) + ')' if self.use_scaler else ''}, "
                f"channels_last {self.channels_last}")


def precision_plan(device: Union[torch.device, str], cfg: Mapping) -> PrecisionPlan:
    """The plan for config keys ``fp16``, ``teacher_fp16``, ``amp_dtype`` and ``channels_last``
    (missing keys take their defaults: False, True, "auto", None).

    Raises:
        ValueError: ``amp_dtype`` is not one of ``AMP_DTYPES``, or the device has no autocast for
            the asked dtype.
    """
    device_type = torch.device(device).type
    amp = cfg.get("amp_dtype", "auto")
    if amp not in AMP_DTYPES:
        raise ValueError(f"config key 'amp_dtype' must be one of {list(AMP_DTYPES)}, got {amp!r}")
    wanted = AMP_DTYPES[amp]
    if wanted is not None and not torch.amp.is_autocast_available(device_type):
        raise ValueError(f"config key 'amp_dtype' = {amp!r}: torch {torch.__version__} has no "
                         f"autocast on {device_type!r}; use amp_dtype='auto' or fp16=False")
    dtype = None
    if cfg.get("fp16", False):
        dtype = wanted if wanted is not None else default_autocast_dtype(device_type)
    channels_last = cfg.get("channels_last", None)
    if channels_last is None:
        channels_last = device_type != "cpu"
    return PrecisionPlan(device_type=device_type, autocast_dtype=dtype, teacher_dtype=wanted,
                         channels_last=bool(channels_last))


def unscale_gradients(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer
                      ) -> Optional[torch.Tensor]:
    """``scaler.unscale_(optimizer)`` and this rank's found-inf flag of the unscaled gradients as
    a 0-d float tensor on the device -- no host read (the trainer folds it into the step's one
    read, all ranks agreeing).  None when the scaler is disabled (fp32, bfloat16)."""
    if not scaler.is_enabled():
        return None
    scaler.unscale_(optimizer)
    flags = list(scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values())
    return torch.stack([f.reshape(()).to(flags[0].device) for f in flags]).amax()


def step_scaled(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, overflow: bool,
                agreed_found_inf: Optional[torch.Tensor] = None) -> bool:
    """After ``unscale_gradients`` and the host read: ``optimizer.step()`` unless ``overflow``
    (the found-inf every rank agreed on), then the scale update (back-off after an overflow,
    growth after ``growth_interval`` clean steps) -- GradScaler.step + update without the
    ``.item()`` GradScaler.step makes.  ``agreed_found_inf``: the all-ranks flag as a device
    tensor; it replaces the per-rank flags the update reads, so every rank keeps the same scale.
    Returns True when the optimizer stepped."""
    if not overflow:
        optimizer.step()
    if scaler.is_enabled():
        found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        if agreed_found_inf is not None:
            for tensor in found.values():
                tensor.copy_(agreed_found_inf.reshape(tensor.shape).to(tensor))
        scaler.update()
    return not overflow


def drop_scaled_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """A step dropped for a non-finite loss: forget ``unscale_gradients``'s record without a scale
    update -- the loss, not the gradient scale, was at fault, so the scale does not back off."""
    if scaler.is_enabled():
        scaler._per_optimizer_states.pop(id(optimizer), None)   # fresh state on next access
