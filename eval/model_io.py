"""Evaluation I/O: load an embedding model (torch checkpoint or ONNX file); atomic result files.

Every evaluation tool (IJB-B/C, ``.bin`` verification, ONNX checks) sees a model as an
``Embedder``: a callable ``images -> features`` taking ``[B, 3, 112, 112]`` uint8 RGB on the CPU
and returning ``[B, D]`` float32 on the CPU.  The pixel normalisation lives here, once:

* torch backbones get arcface_torch's ``(x / 255 - 0.5) / 0.5`` (what they were trained with);
* ONNX files get ``(x - 127.5) / 127.5`` outside the graph, as InsightFace's ``ArcFaceONNX`` and
  the ICCV21-MFR server feed them (the two agree to float rounding).
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional, Protocol

import numpy as np
import torch
from torch import nn

from plugins.backbones import load_backbone_weights, resolve_model

LOG = logging.getLogger(__name__)


class Embedder(Protocol):
    """``__call__(images [B, 3, H, W] uint8 RGB, CPU) -> [B, D] float32, CPU``."""

    description: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"an embedder takes [B, 3, H, W] uint8 RGB images, got "
                         f"{images.dtype} {list(images.shape)}")


class TorchEmbedder:
    """A torch backbone in eval mode as an ``Embedder``.

    Args:
        backbone: network mapping normalised ``[B, 3, H, W]`` float to ``[B, D]`` (a DDP /
            DataParallel wrapper is unwrapped, so rank 0 can call it alone).
        device: where to run it; default the device of its first parameter.
        autocast: run under float16 autocast when the device is CUDA (ignored on CPU).
        description: what to call the model in reports.
    """

    def __init__(self,
                 backbone: nn.Module,
                 device: Optional[torch.device] = None,
                 autocast: bool = True,
                 description: str = "torch backbone") -> None:
        if isinstance(backbone, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            backbone = backbone.module
        self.backbone = backbone
        first = next(backbone.parameters(), None)
        self.device = torch.device(device) if device is not None else (
            first.device if first is not None else torch.device("cpu"))
        self.autocast = bool(autocast) and self.device.type == "cuda"
        self.description = description

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.float16,
                                                        enabled=self.autocast):
                x = images.to(self.device, non_blocking=True).float()
                x = (x / 255.0 - 0.5) / 0.5
                if self.device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                feats = self.backbone(x)
        finally:
            self.backbone.train(was_training)
        return feats.float().cpu()


class OnnxEmbedder:
    """An ONNX recognition model (onnxruntime) as an ``Embedder``; mean/std 127.5 outside.

    Args:
        path: the ``.onnx`` file: one input ``[N, 3, H, W]`` float32 RGB, one ``[N, D]`` output.
        providers: onnxruntime execution providers; default CUDA when available, then CPU.
    """

    def __init__(self, path: str, providers: Optional[List[str]] = None) -> None:
        import onnxruntime

        if providers is None:
            available = onnxruntime.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                         if p in available]
        try:
            self.session = onnxruntime.InferenceSession(path, providers=providers)
        except Exception as error:  # onnxruntime raises its own exception classes
            raise ValueError(f"{path}: onnxruntime cannot load it ({error})") from error
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0].shape) != 4:
            raise ValueError(f"{path}: expected one [N, 3, H, W] input and one output, got "
                             f"inputs {[(i.name, i.shape) for i in inputs]}, outputs "
                             f"{[(o.name, o.shape) for o in outputs]}")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.description = f"onnx:{os.path.basename(path)}"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        blob = (images.numpy().astype(np.float32) - 127.5) / 127.5
        out = self.session.run([self.output_name], {self.input_name: blob})[0]
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def load_backbone(model_path: str, network: str, num_features: int = 512) -> nn.Module:
    """Build ``network`` (``plugins.backbones.resolve_model``) and load ``model_path`` strictly.

    Accepts arcface_torch's ``model.pt`` (a bare state_dict) and its ``checkpoint_gpu_0.pt``
    (``state_dict_backbone``); a mismatch raises ValueError naming the networks that would fit.
    """
    if not os.path.isfile(model_path):
        raise ValueError(f"model file {model_path} does not exist")
    backbone = resolve_model(network, num_features=num_features, fp16=False, dropout=0.0)
    load_backbone_weights(backbone, model_path, network)
    return backbone.eval()


def load_embedder(model_path: str,
                  network: Optional[str],
                  device: Optional[str] = None,
                  num_features: int = 512,
                  autocast: bool = True) -> Embedder:
    """An ``Embedder`` for an ``.onnx`` file (``network`` ignored) or a torch checkpoint.

    Args:
        model_path: ``*.onnx``, or a backbone state_dict / arcface_torch checkpoint file.
        network: backbone name for a torch checkpoint (e.g. ``r50``, ``mobilefacenet``).
        device: torch device; default CUDA when available, else CPU.
        num_features: embedding size D of the torch backbone.
        autocast: float16 autocast on CUDA for the torch backbone.
    """
    if model_path.lower().endswith(".onnx"):
        if not os.path.isfile(model_path):
            raise ValueError(f"model file {model_path} does not exist")
        return OnnxEmbedder(model_path)
    if not network:
        raise ValueError(f"{model_path} is a torch checkpoint: pass the backbone name "
                         f"(--network, e.g. r50 or mobilefacenet)")
    dev = torch.device(device) if device else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_backbone(model_path, network, num_features).to(dev)
    if dev.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
    return TorchEmbedder(backbone, dev, autocast=autocast,
                         description=f"{network}:{os.path.basename(model_path)}")
