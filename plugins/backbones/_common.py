"""Pieces every bundled backbone shares: the ``fp16`` autocast rule and the input check."""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

INPUT_SIZE = 112


def trunk_autocast(x: torch.Tensor, fp16: bool) -> ContextManager:
    """Autocast context for the convolutional trunk of a backbone built with ``fp16=True``.

    arcface_torch's meaning of ``fp16``: the trunk runs under autocast, the embedding head in fp32.
    The device type is taken from the input ``x``: on ``cuda`` the trunk runs in float16; on ``cpu``
    in bfloat16 (CPU autocast has no float16 convolutions); any other device type runs in float16
    when torch supports autocast there, else in fp32.  ``fp16=False`` is a no-op context.
    """
    if not fp16:
        return contextlib.nullcontext()
    device_type = x.device.type
    if device_type == "cpu":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    if device_type == "cuda" or torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, dtype=torch.float16)
    return contextlib.nullcontext()


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
