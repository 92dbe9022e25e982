"""Improved ResNets (r18 ... r200) with arcface_torch's state_dict layout.

Keys: ``conv1, bn1, prelu, layer{1..4}.<i>.{bn1, conv1, bn2, prelu, conv2, bn3,
downsample.0, downsample.1}, bn2, fc, features`` -- an arcface_torch or AdaDistill ``model.pt``
loads without conversion.  Architecture (Deng et al., ArcFace, CVPR 2019, "IR" block):
stem 3x3 conv (64) -> four stages of pre-activation basic blocks
``BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN (+ shortcut)``, each stage halving the
resolution (112 -> 56 -> 28 -> 14 -> 7) with 64/128/256/512 channels -> BN -> flatten
``[B, 512 * 7 * 7]`` -> dropout -> fc -> BatchNorm1d whose scale is frozen at 1.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._common import check_face_batch, trunk_autocast
from ._registry import register_model

STAGE_WIDTHS = (64, 128, 256, 512)
FEATURE_MAP = 7  # spatial size after the four stride-2 stages on a 112 x 112 input


class IBasicBlock(nn.Module):
    """Pre-activation residual block of the IR networks.

    Args:
        in_channels: channels of the input ``[B, in_channels, H, W]``.
        channels: channels of the output ``[B, channels, H / stride, W / stride]``.
        stride: stride of the second convolution (and of the shortcut projection).
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels, eps=1e-5)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                nn.BatchNorm2d(channels, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x)))))
        return self.bn3(y) + shortcut


class IResNet(nn.Module):
    """IR backbone: ``[B, 3, 112, 112]`` normalised RGB -> ``[B, num_features]`` embeddings.

    Args:
        depths: number of blocks of the four stages, e.g. ``(3, 4, 14, 3)`` for r50.
        num_features: embedding size D.
        dropout: dropout probability on the flattened ``[B, 25088]`` features before ``fc``.
        fp16: run the trunk (stem and stages) under autocast and the head
            (bn2, flatten, dropout, fc, features) in fp32; see ``_common.trunk_autocast``.
        use_checkpoint: in training mode, recompute each block's activations in the backward
            pass instead of storing them (saves memory for r100/r200, costs one extra forward).
    """

    def __init__(self,
                 depths: Sequence[int],
                 num_features: int = 512,
                 dropout: float = 0.0,
                 fp16: bool = False,
                 use_checkpoint: bool = False) -> None:
        super().__init__()
        if len(depths) != 4 or min(depths) < 1:
            raise ValueError(f"IResNet needs four stage depths >= 1, got {list(depths)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"IResNet dropout must be in [0, 1), got {dropout}")
        self.fp16 = fp16
        self.use_checkpoint = use_checkpoint
        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0], eps=1e-5)
        self.prelu = nn.PReLU(STAGE_WIDTHS[0])
        in_channels = STAGE_WIDTHS[0]
        for index, (width, depth) in enumerate(zip(STAGE_WIDTHS, depths), start=1):
            blocks = [IBasicBlock(in_channels, width, stride=2)]
            blocks += [IBasicBlock(width, width) for _ in range(depth - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
            in_channels = width
        self.bn2 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_channels * FEATURE_MAP * FEATURE_MAP, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        self._init_weights()

    def _init_weights(self) -> None:
        """arcface_torch's initialisation: conv weights N(0, 0.1), BN scale 1 and shift 0; the
        scale of the embedding BatchNorm1d is fixed at 1 (kept in the state_dict, never trained)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        for block in stage:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, 3, 112, 112]`` -> embeddings ``[B, num_features]`` (float32)."""
        check_face_batch(x, type(self).__name__)
        with trunk_autocast(x, self.fp16):
            x = self.prelu(self.bn1(self.conv1(x)))
            for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
                x = self._run_stage(stage, x)
        x = torch.flatten(self.bn2(x.float()), 1)
        return self.features(self.fc(self.dropout(x)))


def _iresnet(depths: Sequence[int], num_features: int, fp16: bool, dropout: float,
             use_checkpoint: bool) -> IResNet:
    return IResNet(depths, num_features=num_features, dropout=dropout, fp16=fp16,
                   use_checkpoint=use_checkpoint)


@register_model("r18")
def iresnet18(num_features: int = 512, fp16: bool = False, dropout: float = 0.0,
              use_checkpoint: bool = False) -> IResNet:
    """IResNet-18, depths (2, 2, 2, 2): 24.0M parameters, 187 state_dict keys."""
    return _iresnet((2, 2, 2, 2), num_features, fp16, dropout, use_checkpoint)


@register_model("r34")
def iresnet34(num_features: int = 512, fp16: bool = False, dropout: float = 0.0,
              use_checkpoint: bool = False) -> IResNet:
    """IResNet-34, depths (3, 4, 6, 3): 34.1M parameters, 331 state_dict keys."""
    return _iresnet((3, 4, 6, 3), num_features, fp16, dropout, use_checkpoint)


@register_model("r50")
def iresnet50(num_features: int = 512, fp16: bool = False, dropout: float = 0.0,
              use_checkpoint: bool = False) -> IResNet:
    """IResNet-50, depths (3, 4, 14, 3): 43.6M parameters, 475 state_dict keys."""
    return _iresnet((3, 4, 14, 3), num_features, fp16, dropout, use_checkpoint)


@register_model("r100")
def iresnet100(num_features: int = 512, fp16: bool = False, dropout: float = 0.0,
               use_checkpoint: bool = False) -> IResNet:
    """IResNet-100, depths (3, 13, 30, 3): 65.2M parameters, 925 state_dict keys."""
    return _iresnet((3, 13, 30, 3), num_features, fp16, dropout, use_checkpoint)


@register_model("r200")
def iresnet200(num_features: int = 512, fp16: bool = False, dropout: float = 0.0,
               use_checkpoint: bool = False) -> IResNet:
    """IResNet-200, depths (6, 26, 60, 6): 118.8M parameters, 1807 state_dict keys."""
    return _iresnet((6, 26, 60, 6), num_features, fp16, dropout, use_checkpoint)
