"""Two very small backbones for the CPU demo and fast trainer tests ONLY (``tiny_s``, ``tiny_t``).

They are not face-recognition models anyone should deploy: they exist so that a distillation run
(teacher ``tiny_t`` -> student ``tiny_s``) trains in minutes on a 2-core CPU with synthetic faces,
with the teacher clearly stronger than the student.  Same interface as the real backbones:
``[B, 3, 112, 112]`` normalised RGB -> ``[B, num_features]``.

Architecture: a stride-2 3x3 stem (112 -> 56), stages of ``conv3x3-BN-PReLU`` units whose first
unit has stride 2 (56 -> 28 -> 14 -> 7), then BN -> flatten -> dropout -> linear -> BatchNorm1d.
Compute at 112 x 112, D = 512 (FLOPs = 2 x multiply-accumulates, the convention behind
MobileFaceNet's "0.45 GFLOPs"): tiny_s 29 MFLOPs / 2.49M parameters (mostly the linear layer),
tiny_t 93 MFLOPs (3.2x) / 4.24M parameters.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ._common import check_face_batch, trunk_autocast
from ._registry import register_model


def conv_bn_prelu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """``3x3 conv (stride) -> BN -> PReLU``: ``[B, C_in, H, W]`` -> ``[B, C_out, H/s, W/s]``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.PReLU(out_channels))


class TinyFaceNet(nn.Module):
    """Plain strided CNN for demos and tests.

    Args:
        stem_width: channels of the stride-2 stem (output 56 x 56).
        widths: channels of the three stride-2 stages (outputs 28, 14, 7).
        depths: conv units per stage (the first of each has stride 2).
        num_features: embedding size D.
        dropout: dropout probability before the linear layer.
        fp16: stem and stages under autocast, head in fp32 (as the real backbones).
    """

    def __init__(self,
                 stem_width: int,
                 widths: Sequence[int],
                 depths: Sequence[int],
                 num_features: int = 512,
                 dropout: float = 0.0,
                 fp16: bool = False) -> None:
        super().__init__()
        if len(widths) != 3 or len(depths) != 3 or min(depths) < 1:
            raise ValueError(f"TinyFaceNet needs three widths and three depths >= 1, "
                             f"got widths={list(widths)}, depths={list(depths)}")
        self.fp16 = fp16
        self.stem = conv_bn_prelu(3, stem_width, stride=2)
        stages = []
        in_channels = stem_width
        for width, depth in zip(widths, depths):
            units = [conv_bn_prelu(in_channels, width, stride=2)]
            units += [conv_bn_prelu(width, width, stride=1) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*units))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(in_channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, 3, 112, 112]`` -> embeddings ``[B, num_features]`` (float32)."""
        check_face_batch(x, type(self).__name__)
        with trunk_autocast(x, self.fp16):
            x = self.stages(self.stem(x))
        x = torch.flatten(self.bn(x.float()), 1)
        return self.features(self.fc(self.dropout(x)))


@register_model("tiny_s")
def tiny_s(num_features: int = 512, fp16: bool = False, dropout: float = 0.0) -> TinyFaceNet:
    """Demo/test student (29 MFLOPs): stem 16, stages 24/48/96 with depths (1, 2, 1)."""
    return TinyFaceNet(16, (24, 48, 96), (1, 2, 1), num_features, dropout, fp16)


@register_model("tiny_t")
def tiny_t(num_features: int = 512, fp16: bool = False, dropout: float = 0.0) -> TinyFaceNet:
    """Demo/test teacher (93 MFLOPs, 3.2x tiny_s): stem 24, stages 40/80/160 with depths
    (2, 2, 1)."""
    return TinyFaceNet(24, (40, 80, 160), (2, 2, 1), num_features, dropout, fp16)
