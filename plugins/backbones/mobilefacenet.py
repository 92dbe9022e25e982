"""arcface_torch's MobileFaceNet variants ``mbf`` and ``mbf_large`` with its state_dict layout.

Keys: ``layers.<i>.*`` (stem and stages), ``conv_sep.*`` (1x1 conv to 512 channels),
``features.layers.{0,2,3}.*`` (GDC head: 7x7 depthwise conv + BN, linear without bias,
BatchNorm1d), so arcface_torch checkpoints load without conversion.

Architecture (Chen et al., MobileFaceNets, CCBR 2018, widened by ``scale``): every module holds
its ops in a ``layers`` Sequential.  A ``DepthWise`` block is
``1x1 conv -> PReLU -> 3x3 depthwise conv (stride) -> PReLU -> 1x1 linear projection``
(each conv followed by BN); a ``Residual`` stage stacks stride-1 DepthWise blocks with identity
shortcuts.  Spatial sizes 112 -> 56 -> 28 -> 14 -> 7.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ._common import check_face_batch, init_mobilefacenet_weights, trunk_autocast
from ._registry import register_model


class ConvBlock(nn.Module):
    """``conv -> BN -> PReLU`` held in ``layers`` (keys ``layers.{0,1,2}``).

    Args:
        in_channels / out_channels: channels of ``[B, C_in, H, W]`` -> ``[B, C_out, H', W']``.
        kernel / stride / padding / groups: of the convolution (no bias).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1,
                 padding: int = 0, groups: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_channels),
            nn.PReLU(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """``conv -> BN`` without activation, held in ``layers`` (keys ``layers.{0,1}``).

    Args: as ``ConvBlock``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1,
                 padding: int = 0, groups: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: expand to ``hidden`` (1x1), depthwise 3x3, project (1x1, linear).

    Args:
        in_channels / out_channels: ``[B, C_in, H, W]`` -> ``[B, C_out, H / stride, W / stride]``.
        hidden: channels of the depthwise convolution.
        stride: stride of the depthwise convolution.
        residual: add the input to the output (needs stride 1 and equal channels).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int, stride: int = 2,
                 residual: bool = False) -> None:
        super().__init__()
        if residual and (stride != 1 or in_channels != out_channels):
            raise ValueError("a residual DepthWise block needs stride 1 and in == out channels")
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_channels, hidden),
            ConvBlock(hidden, hidden, kernel=3, stride=stride, padding=1, groups=hidden),
            LinearBlock(hidden, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(x)
        return x + y if self.residual else y


class Residual(nn.Module):
    """``num_blocks`` stride-1 residual DepthWise blocks of width ``channels``, hidden ``hidden``.

    Args:
        channels: channels in and out.
        num_blocks: number of blocks (keys ``layers.<i>``).
        hidden: channels of each block's depthwise convolution.
    """

    def __init__(self, channels: int, num_blocks: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[
            DepthWise(channels, channels, hidden, stride=1, residual=True)
            for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise convolution head: ``[B, 512, 7, 7]`` -> ``[B, num_features]``.

    7x7 depthwise conv + BN -> flatten -> linear (no bias) -> BatchNorm1d (affine).

    Args:
        num_features: embedding size D.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(512, 512, kernel=7, groups=512),
            nn.Flatten(),
            nn.Linear(512, num_features, bias=False),
            nn.BatchNorm1d(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """arcface_torch MobileFaceNet: ``[B, 3, 112, 112]`` -> ``[B, num_features]`` (float32).

    Args:
        num_features: embedding size D.
        fp16: run ``layers`` under autocast; ``conv_sep`` and the GDC head run in fp32.
        blocks: residual blocks of the four stages; ``blocks[0] == 1`` means a single depthwise
            ConvBlock instead of a Residual stage (as upstream).
        scale: width multiplier; stage widths are ``64 * scale`` and ``128 * scale``.
    """

    def __init__(self,
                 num_features: int = 512,
                 fp16: bool = False,
                 blocks: Sequence[int] = (1, 4, 6, 2),
                 scale: int = 2) -> None:
        super().__init__()
        if len(blocks) != 4 or min(blocks) < 1 or scale < 1:
            raise ValueError(f"MobileFaceNet needs four block counts >= 1 and scale >= 1, "
                             f"got blocks={list(blocks)}, scale={scale}")
        self.fp16 = fp16
        narrow, wide = 64 * scale, 128 * scale
        if blocks[0] == 1:
            stage0: nn.Module = ConvBlock(narrow, narrow, kernel=3, padding=1, groups=64)
        else:
            stage0 = Residual(narrow, blocks[0], hidden=128)
        self.layers = nn.ModuleList([
            ConvBlock(3, narrow, kernel=3, stride=2, padding=1),
            stage0,
            DepthWise(narrow, narrow, hidden=128, stride=2),
            Residual(narrow, blocks[1], hidden=128),
            DepthWise(narrow, wide, hidden=256, stride=2),
            Residual(wide, blocks[2], hidden=256),
            DepthWise(wide, wide, hidden=512, stride=2),
            Residual(wide, blocks[3], hidden=256),
        ])
        self.conv_sep = ConvBlock(wide, 512)
        self.features = GDC(num_features)
        init_mobilefacenet_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, 3, 112, 112]`` -> embeddings ``[B, num_features]``."""
        check_face_batch(x, type(self).__name__)
        with trunk_autocast(x, self.fp16):
            for layer in self.layers:
                x = layer(x)
        return self.features(self.conv_sep(x.float()))


@register_model("mbf")
def mbf(num_features: int = 512, fp16: bool = False) -> MobileFaceNet:
    """arcface_torch ``mbf``: blocks (1, 4, 6, 2), scale 2; 2.06M parameters, 333 keys."""
    return MobileFaceNet(num_features, fp16, blocks=(1, 4, 6, 2), scale=2)


@register_model("mbf_large")
def mbf_large(num_features: int = 512, fp16: bool = False) -> MobileFaceNet:
    """arcface_torch ``mbf_large``: blocks (2, 8, 12, 4), scale 4; 6.31M parameters, 606 keys."""
    return MobileFaceNet(num_features, fp16, blocks=(2, 8, 12, 4), scale=4)
