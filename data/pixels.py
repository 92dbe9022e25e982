"""Pixel normalisation of arcface_torch, ``(x / 255 - 0.5) / 0.5`` in float32, as a table lookup.

arcface_torch normalises each uint8 value ``x`` of an RGB image with three float32 operations.
The result depends on ``x`` alone, so the 256 possible results are computed once, with exactly
those operations (``NORMALISE_TABLE``), and an image is normalised by looking its bytes up: the
same bits as the arithmetic, in one pass instead of four, and on any device.

Two places do it:

- ``normalise_image``: one decoded image ``[S, S, 3]`` uint8 -> ``[3, S, S]`` float32 on the host
  (a ``FaceRecordDataset`` item, ``pixels="float"``);
- ``normalise_batch``: a collated batch ``[B, S, S, 3]`` uint8 -> ``[B, 3, S, S]`` float32 on the
  batch's device (``pixels="uint8"``: the loader ships bytes, a quarter of the floats, and the GPU
  does the lookup).
"""
from __future__ import annotations

from typing import Dict

import cv2
import numpy as np
import torch


def _table() -> np.ndarray:
    values = np.arange(256, dtype=np.uint8).astype(np.float32)
    values /= 255.0          # the operations and their order of arcface_torch's transform
    values -= 0.5
    values /= 0.5
    values.setflags(write=False)
    return values


NORMALISE_TABLE: np.ndarray = _table()          # [256] float32, read-only
_device_tables: Dict[torch.device, torch.Tensor] = {}


def normalise_image(rgb: np.ndarray, flip: bool) -> np.ndarray:
    """``[S, S, 3]`` uint8 RGB -> ``[3, S, S]`` float32 C-contiguous, mirrored left-right when
    ``flip``: ``(x / 255 - 0.5) / 0.5`` bit for bit.  OpenCV does the mirror and the lookup
    (vectorised, ~4x numpy's four passes); numpy the transpose to channels-first."""
    if flip:
        rgb = cv2.flip(rgb, 1)
    hwc = cv2.LUT(rgb, NORMALISE_TABLE)            # [S, S, 3] float32 (the table's dtype)
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def device_table(device: torch.device) -> torch.Tensor:
    """``NORMALISE_TABLE`` as a ``[256]`` float32 tensor on ``device`` (made once per device)."""
    device = torch.device(device)
    table = _device_tables.get(device)
    if table is None:
        table = torch.from_numpy(NORMALISE_TABLE.copy()).to(device)
        _device_tables[device] = table
    return table


def normalise_batch(images: torch.Tensor) -> torch.Tensor:
    """``[B, S, S, 3]`` uint8 RGB (already mirrored) -> ``[B, 3, S, S]`` float32, contiguous, on
    the same device: the same bits as ``normalise_image`` of each image."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[3] != 3:
        raise ValueError(f"normalise_batch expects a [B, S, S, 3] uint8 batch, got "
                         f"{tuple(images.shape)} {images.dtype}")
    # int32 indices in [B, 3, S, S] order (one pass over the bytes), then the table lookup
    index = images.permute(0, 3, 1, 2).to(torch.int32, memory_format=torch.contiguous_format)
    table = device_table(images.device)
    return table.index_select(0, index.reshape(-1)).view(index.shape)
