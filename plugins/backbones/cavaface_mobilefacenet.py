"""The cavaface-style MobileFaceNet that AdaDistill trains as its student (name ``mobilefacenet``).

Not arcface_torch's ``mbf``: 64 channels, 1,199,488 parameters (~0.45 GMACs at 112 x 112),
331 state_dict keys named as in AdaDistill's release checkpoints:
``conv1``, ``conv2_dw``, ``conv_23``, ``conv_3.model.<i>``, ``conv_34``, ``conv_4.model.<i>``,
``conv_45``, ``conv_5.model.<i>``, ``conv_6_sep``, ``output_layer.{conv_6_dw, linear, bn}``,
each conv unit with sub-keys ``conv``, ``bn`` and (with activation) ``prelu``.

Architecture (Chen et al., MobileFaceNets, CCBR 2018): 3x3 conv stride 2 (64) -> 3x3 depthwise
-> bottleneck stages 64 (x4, hidden 128) / 128 (x6, hidden 256) / 128 (x2, hidden 256) with
stride-2 transitions -> 1x1 conv to 512 -> GDC head (7x7 depthwise conv + BN, linear 512 -> D
without bias, BatchNorm1d without affine parameters).
"""
from __future__ import annotations

import torch
from torch import nn

from ._common import check_face_batch, init_mobilefacenet_weights, trunk_autocast
from ._registry import register_model


class ConvUnit(nn.Module):
    """``conv -> BN [-> PReLU]`` with keys ``conv``, ``bn`` and, when ``activation``, ``prelu``.

    Args:
        in_channels / out_channels: ``[B, C_in, H, W]`` -> ``[B, C_out, H', W']``.
        kernel / stride / padding / groups: of the convolution (no bias).
        activation: end with a per-channel PReLU (False: a linear projection).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1,
                 padding: int = 0, groups: int = 1, activation: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups,
                              bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.prelu = nn.PReLU(out_channels) if activation else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return x if self.prelu is None else self.prelu(x)


class Bottleneck(nn.Module):
    """Expand (1x1, ``conv``) -> depthwise 3x3 (``conv_dw``) -> linear projection (``project``).

    Args:
        in_channels / out_channels: ``[B, C_in, H, W]`` -> ``[B, C_out, H / stride, W / stride]``.
        hidden: channels of the depthwise convolution.
        stride: stride of the depthwise convolution.
        residual: add the input (stride 1, equal channels only).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int, stride: int,
                 residual: bool = False) -> None:
        super().__init__()
        if residual and (stride != 1 or in_channels != out_channels):
            raise ValueError("a residual Bottleneck needs stride 1 and in == out channels")
        self.residual = residual
        self.conv = ConvUnit(in_channels, hidden)
        self.conv_dw = ConvUnit(hidden, hidden, kernel=3, stride=stride, padding=1, groups=hidden)
        self.project = ConvUnit(hidden, out_channels, activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.conv_dw(self.conv(x)))
        return x + y if self.residual else y


class ResidualStage(nn.Module):
    """``num_blocks`` residual stride-1 bottlenecks (keys ``model.<i>``).

    Args:
        channels: channels in and out.
        num_blocks: number of bottlenecks.
        hidden: depthwise width of each bottleneck.
    """

    def __init__(self, channels: int, num_blocks: int, hidden: int) -> None:
        super().__init__()
        self.model = nn.Sequential(*[
            Bottleneck(channels, channels, hidden, stride=1, residual=True)
            for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class GDCHead(nn.Module):
    """Global depthwise convolution head: ``[B, C, 7, 7]`` -> ``[B, num_features]``.

    Args:
        in_channels: C, channels of the last feature map.
        num_features: embedding size D.
    """

    def __init__(self, in_channels: int, num_features: int) -> None:
        super().__init__()
        self.conv_6_dw = ConvUnit(in_channels, in_channels, kernel=7, groups=in_channels,
                                  activation=False)
        self.linear = nn.Linear(in_channels, num_features, bias=False)
        self.bn = nn.BatchNorm1d(num_features, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(torch.flatten(self.conv_6_dw(x), 1)))


class CavaMobileFaceNet(nn.Module):
    """AdaDistill's student: ``[B, 3, 112, 112]`` normalised RGB -> ``[B, num_features]``.

    Args:
        num_features: embedding size D (AdaDistill uses 512).
        fp16: run the convolutional stages up to ``conv_5`` under autocast; ``conv_6_sep`` and the
            GDC head run in fp32 (the same split as arcface_torch's ``mbf``).
    """

    def __init__(self, num_features: int = 512, fp16: bool = False) -> None:
        super().__init__()
        self.fp16 = fp16
        self.conv1 = ConvUnit(3, 64, kernel=3, stride=2, padding=1)
        self.conv2_dw = ConvUnit(64, 64, kernel=3, padding=1, groups=64)
        self.conv_23 = Bottleneck(64, 64, hidden=128, stride=2)
        self.conv_3 = ResidualStage(64, num_blocks=4, hidden=128)
        self.conv_34 = Bottleneck(64, 128, hidden=256, stride=2)
        self.conv_4 = ResidualStage(128, num_blocks=6, hidden=256)
        self.conv_45 = Bottleneck(128, 128, hidden=512, stride=2)
        self.conv_5 = ResidualStage(128, num_blocks=2, hidden=256)
        self.conv_6_sep = ConvUnit(128, 512)
        self.output_layer = GDCHead(512, num_features)
        init_mobilefacenet_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, 3, 112, 112]`` -> embeddings ``[B, num_features]`` (float32)."""
        check_face_batch(x, type(self).__name__)
        with trunk_autocast(x, self.fp16):
            for stage in (self.conv1, self.conv2_dw, self.conv_23, self.conv_3, self.conv_34,
                          self.conv_4, self.conv_45, self.conv_5):
                x = stage(x)
        return self.output_layer(self.conv_6_sep(x.float()))


@register_model("mobilefacenet")
def mobilefacenet(num_features: int = 512, fp16: bool = False) -> CavaMobileFaceNet:
    """AdaDistill's MobileFaceNet student: 1,199,488 parameters, 331 keys (at D = 512)."""
    return CavaMobileFaceNet(num_features, fp16)
