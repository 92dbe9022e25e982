"""Pieces every bundled backbone shares: the ``fp16`` autocast rule and the input check."""
from __future__ import annotations

import contextlib
from typing import ContextManager, Optional, Union

import torch

INPUT_SIZE = 112


def default_autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The half type ``fp16=True`` means on a device type: float16 on GPUs (``cuda`` and any other
    device type with autocast), bfloat16 on ``cpu`` (CPU float16 kernels are slow and bfloat16 has
    fp32's range, so no GradScaler is needed), None where torch has no autocast."""
    if device_type == "cpu":
        return torch.bfloat16
    if device_type == "cuda" or torch.amp.is_autocast_available(device_type):
        return torch.float16
    return None


def trunk_autocast(x: torch.Tensor, fp16: Union[bool, torch.dtype]) -> ContextManager:
    """Autocast context for the convolutional trunk of a backbone built with ``fp16=True``.

    arcface_torch's meaning of ``fp16``: the trunk runs under autocast, the embedding head in fp32.
    The device type is taken from the input ``x``; ``fp16=True`` autocasts to
    ``default_autocast_dtype`` of that device type (float16 on CUDA, bfloat16 on CPU, fp32 where
    torch has no autocast); ``fp16`` given as a ``torch.dtype`` autocasts to that dtype on any
    device (``engine/precision.py`` passes ``torch.float16`` to run the CUDA recipe on a CPU).
    ``fp16=False`` is a no-op context.
    """
    device_type = x.device.type
    if isinstance(fp16, torch.dtype):
        dtype = fp16
    else:
        dtype = default_autocast_dtype(device_type) if fp16 else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def check_face_batch(x: torch.Tensor, network: str) -> None:
    """Raise ValueError unless ``x`` is a ``[B, 3, 112, 112]`` batch (the heads need 7x7 maps).

    Skipped while the TorchScript tracer runs (ONNX export): there the sizes are traced tensors.
    """
    if torch.jit.is_tracing():
        return
    if x.dim() != 4 or tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
        raise ValueError(
            f"{network} expects aligned RGB faces of shape [B, 3, {INPUT_SIZE}, {INPUT_SIZE}] "
            f"normalised as (x / 255 - 0.5) / 0.5, got {list(x.shape)}")


def init_mobilefacenet_weights(model: torch.nn.Module) -> None:
    """The MobileFaceNets' initialisation: Kaiming-normal (fan_out) convs and linears, BN scale 1
    and shift 0."""
    nn = torch.nn
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
