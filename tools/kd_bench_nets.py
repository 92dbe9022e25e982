"""The distillation benchmark's own networks (bench/kd_quality.py), registered with the backbone
registry by ``register()``.  CPU-benchmark networks only: nobody should deploy them.

- ``kdb_student`` (the ``short`` regime's student): TinyFaceNet at a quarter of tiny_s's widths.
- ``kdb_patch_teacher`` / ``kdb_patch_student`` (the ``converged`` regime): ``PatchFaceNet``, a
  4 x 4 stride-4 "patch" stem (112 -> 28) before stride-2 ``conv3x3-BN-PReLU`` stages.  On one
  CPU thread a stride-2 stem at 56 x 56 costs most of a small network's step (its weight
  gradient and PReLU backward over 3,136 positions per image).  Measured through the
  benchmark's trainer (one thread, two jobs side by side on the 2-core machine):
  kdb_patch_student ~1,100 images/s against kdb_student's ~450, kdb_patch_teacher ~180 against
  tiny_t's ~60 -- what lets the converged regime's 33 student runs and a plateaued teacher fit
  in its hour.

Shapes: ``[B, 3, 112, 112]`` normalised RGB -> ``[B, num_features]`` float32, as every backbone.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from plugins.backbones import register_model
from plugins.backbones._common import check_face_batch
from plugins.backbones.tiny import TinyFaceNet, conv_bn_prelu

_REGISTERED = False


class PatchFaceNet(nn.Module):
    """Patch stem + strided CNN stages + the arcface_torch head (BN -> flatten -> linear -> BN1d).

    Args:
        stem_width: channels of the 4 x 4 stride-4 stem (output 28 x 28).
        widths: channels of the stride-2 stages (28 -> 14 -> 7 -> 4 ...).
        depths: conv units per stage (the first of each has stride 2), each >= 1.
        num_features: embedding size D.
    """

    def __init__(self, stem_width: int, widths: Sequence[int], depths: Sequence[int],
                 num_features: int = 512) -> None:
        super().__init__()
        if not widths or len(widths) != len(depths) or min(depths) < 1:
            raise ValueError(f"PatchFaceNet needs one depth >= 1 per stage width, got "
                             f"widths={list(widths)}, depths={list(depths)}")
        self.stem = nn.Sequential(nn.Conv2d(3, stem_width, 4, 4, 0, bias=False),
                                  nn.BatchNorm2d(stem_width), nn.PReLU(stem_width))
        units, channels, side = [], stem_width, 28
        for width, depth in zip(widths, depths):
            units.append(conv_bn_prelu(channels, width, stride=2))
            units += [conv_bn_prelu(width, width, stride=1) for _ in range(depth - 1)]
            channels, side = width, (side + 1) // 2
        self.stages = nn.Sequential(*units)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels * side * side, num_features)
        self.features = nn.BatchNorm1d(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, 3, 112, 112]`` -> embeddings ``[B, num_features]``."""
        check_face_batch(x, type(self).__name__)
        x = self.stages(self.stem(x))
        return self.features(self.fc(torch.flatten(self.bn(x), 1)))


def _fp32_only(name: str, fp16: bool, dropout: float) -> None:
    if fp16 or dropout:
        raise ValueError(f"{name} is a CPU benchmark network: fp32 and no dropout (got "
                         f"fp16={fp16}, dropout={dropout}); set fp16 False and dropout 0")


def register() -> None:
    """Register the three benchmark networks (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return

    @register_model("kdb_student")
    def kdb_student(num_features: int = 512, fp16: bool = False, dropout: float = 0.0):
        """Short-regime student: TinyFaceNet stem 4, stages 6/12/24, depths (1, 1, 1)."""
        return TinyFaceNet(4, (6, 12, 24), (1, 1, 1), num_features, dropout, fp16)

    @register_model("kdb_patch_teacher")
    def kdb_patch_teacher(num_features: int = 512, fp16: bool = False, dropout: float = 0.0):
        """Converged-regime teacher: patch stem 32, stages 64/128, depths (1, 2)."""
        _fp32_only("kdb_patch_teacher", fp16, dropout)
        return PatchFaceNet(32, (64, 128), (1, 2), num_features)

    @register_model("kdb_patch_student")
    def kdb_patch_student(num_features: int = 512, fp16: bool = False, dropout: float = 0.0):
        """Converged-regime student: patch stem 4, stages 8/16, depths (1, 1)."""
        _fp32_only("kdb_patch_student", fp16, dropout)
        return PatchFaceNet(4, (8, 16), (1, 1), num_features)

    _REGISTERED = True
