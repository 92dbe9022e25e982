"""The frozen teacher: a backbone wrapped so that it can only ever run as a feature extractor.

``TeacherHook`` puts the network in eval mode for good (``train()`` on a parent module does not
reach it), freezes every parameter, and runs the forward pass under ``torch.inference_mode`` --
with channels_last and float16 autocast on GPUs (any autocast dtype, CPU included, on request).
It returns the raw fp32 embeddings ``f_t [B, D]`` (not L2-normalised: the heads normalise) as an
ordinary tensor, so the student's loss may use them in its autograd graph.

``TeacherHook`` and ``plugins.teacher_cache.TeacherEmbeddingCache`` are the two "teacher
embedding sources" of a training step; both offer ``teacher_embeddings(images, index, flipped)``
and the trainer calls that without caring which one it holds.
"""
from __future__ import annotations

import hashlib
import os
from contextlib import nullcontext
from typing import Callable, Optional

import torch
from torch import nn

_HASH_BLOCK = 1 << 22  # 4 MiB per read while hashing a checkpoint


def file_digest(path: str) -> str:
    """``"sha256:<hex>"`` of a file, read in 4 MiB blocks (no need to hold it in memory)."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
            sha.update(block)
    return "sha256:" + sha.hexdigest()


def state_dict_digest(model: nn.Module) -> str:
    """``"state-sha256:<hex>"`` over the names, shapes, dtypes and bytes of a model's state_dict.

    The identity of a teacher that was not loaded from a file (tests, in-memory models).
    """
    sha = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        sha.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "state-sha256:" + sha.hexdigest()


class TeacherHook(nn.Module):
    """A frozen backbone that maps images ``[B, 3, H, W]`` to fp32 embeddings ``[B, D]``.

    Args:
        model: the teacher backbone (weights already loaded).  It is frozen in place.
        device: where the teacher runs; ``None`` keeps the device of its parameters.  Input images
            are moved there.
        fp16: run the forward pass under autocast, in ``autocast_dtype``.
        autocast_dtype: the dtype with ``fp16``; None = float16 on GPUs (CUDA and any device type
            with autocast) and fp32 on CPU, where the teacher's output is the distillation target
            and CPU half kernels are slow.  ``torch.float16`` on a CPU runs the GPU recipe there
            (tests, ``bench/gpu_acceptance.py --device cpu``).
        channels_last: use the channels_last memory format; ``None`` means "on CUDA only".
        embedding_size: expected output size ``D``; checked on every call when given.
        network: the backbone's name (recorded in the teacher cache).
        checkpoint: the file the weights came from; its sha256 is the teacher's ``digest``.
    """

    def __init__(self,
                 model: nn.Module,
                 device: Optional[torch.device | str] = None,
                 fp16: bool = False,
                 channels_last: Optional[bool] = None,
                 embedding_size: Optional[int] = None,
                 network: str = "",
                 checkpoint: Optional[str] = None,
                 autocast_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self._device = torch.device(device)
        self.fp16 = bool(fp16)
        self.requested_dtype = autocast_dtype
        cuda = self._device.type == "cuda"
        self.channels_last = cuda if channels_last is None else bool(channels_last)
        self.embedding_size = embedding_size
        self.network = network
        self.checkpoint = checkpoint
        self._digest: Optional[str] = None
        model = model.to(self._device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        for param in model.parameters():
            param.requires_grad_(False)
        self.model = model
        self.train(False)

    def train(self, mode: bool = True) -> "TeacherHook":
        """Ignore ``mode``: the teacher stays in eval mode (BatchNorm statistics, no dropout)."""
        self.training = False
        self.model.eval()
        return self

    @property
    def device(self) -> torch.device:
        """Where the teacher's weights are (follows a ``.to(device)`` of a parent module)."""
        first = next(self.model.parameters(), None)
        return self._device if first is None else first.device

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        """The forward pass's autocast dtype, None for fp32 (see ``autocast_dtype`` above)."""
        return self._autocast_dtype_on(self.device.type)

    def _autocast_dtype_on(self, device_type: str) -> Optional[torch.dtype]:
        if not self.fp16 or not torch.amp.is_autocast_available(device_type):
            return None
        if self.requested_dtype is not None:
            return self.requested_dtype
        return None if device_type == "cpu" else torch.float16

    @property
    def autocast(self) -> bool:
        """Whether the forward pass runs under autocast (``fp16`` where the device has it)."""
        return self.autocast_dtype is not None

    @property
    def digest(self) -> str:
        """sha256 of the checkpoint file (of the state_dict without a file), computed once."""
        if self._digest is None:
            self._digest = (file_digest(self.checkpoint) if self.checkpoint is not None
                            else state_dict_digest(self.model))
        return self._digest

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher embeddings ``f_t [B, D]`` (fp32, not normalised) of ``images [B, 3, H, W]``.

        The result is a normal tensor (not an inference tensor): it can enter the student's
        autograd graph, where it is a constant.
        """
        if images.dim() != 4:
            raise ValueError(f"TeacherHook expects images [B, 3, H, W], got {tuple(images.shape)}")
        # Per-call overhead kept small (one parameter lookup; an autocast context only when one
        # is needed -- ours, or switching off a caller's enclosing one so an fp32 teacher stays
        # fp32): the official loop's teacher step is just ``no_grad`` + forward.
        device = self.device
        images = images.to(device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        dtype = self._autocast_dtype_on(device.type)
        if dtype is not None:
            autocast = torch.autocast(device_type=device.type, dtype=dtype)
        elif torch.is_autocast_enabled(device.type):
            autocast = torch.autocast(device_type=device.type, enabled=False)
        else:
            autocast = nullcontext()
        with torch.inference_mode(), autocast:
            out = self.model(images)
        if out.dim() != 2 or out.shape[0] != images.shape[0] or (
                self.embedding_size is not None and out.shape[1] != self.embedding_size):
            raise RuntimeError(
                f"teacher {self.network or type(self.model).__name__} returned shape "
                f"{tuple(out.shape)} for {images.shape[0]} images; expected "
                f"[{images.shape[0]}, {self.embedding_size or 'D'}] -- check config keys "
                f"teacher_network and teacher_embedding_size")
        # Outside inference mode, a copy of an inference tensor is a normal tensor.
        return out.clone() if out.dtype == torch.float32 else out.float()

    def teacher_embeddings(self, images: torch.Tensor, index: torch.Tensor,
                           flipped: torch.Tensor) -> torch.Tensor:
        """The common "teacher embedding source" call: ``f_t [B, D]`` fp32 of the batch.

        ``index`` and ``flipped`` are unused here (the cache needs them); the images are embedded
        as they are, already flipped by the loader where ``flipped`` is True.
        """
        return self(images)


def build_teacher(network: str,
                  checkpoint: Optional[str],
                  embedding_size: int = 512,
                  device: Optional[torch.device | str] = None,
                  fp16: bool = False,
                  get_model: Optional[Callable[..., nn.Module]] = None,
                  autocast_dtype: Optional[torch.dtype] = None) -> TeacherHook:
    """Build the teacher backbone by name, load its weights and wrap it in a ``TeacherHook``.

    Args:
        network: backbone name (config key ``teacher_network``), e.g. ``"r50"``; ``"onnx"``
            returns a ``plugins.onnx_teacher.OnnxTeacher`` of the ``.onnx`` ``checkpoint``.
        checkpoint: backbone weights (config key ``teacher_checkpoint``).
        embedding_size: the teacher's embedding size (``teacher_embedding_size``).
        device: where the teacher runs (default CPU).
        fp16: autocast (``teacher_fp16``): float16 on GPUs, none on CPU unless ``autocast_dtype``.
        get_model: a factory ``get_model(name, num_features=..., fp16=...)`` such as a fork's
            ``backbones.get_model``; default ``plugins.backbones.resolve_model``.
        autocast_dtype: see ``TeacherHook`` (config key ``amp_dtype``; None for "auto").

    Raises:
        FileNotFoundError: ``checkpoint`` is None or does not exist.
        ValueError: the checkpoint does not fit the network (from ``load_backbone_weights``).
    """
    if network == "onnx":  # an insightface .onnx recognition model, run by onnxruntime
        from .onnx_teacher import build_onnx_teacher
        return build_onnx_teacher(checkpoint, embedding_size=embedding_size, device=device)
    if checkpoint is None or not os.path.isfile(checkpoint):
        raise FileNotFoundError(
            f"config key 'teacher_checkpoint': teacher weights not found at {checkpoint!r}; set it "
            f"to the teacher's backbone .pth/.pt file (arcface_torch model.pt or backbone.pth)")
    from .backbones import resolve_model
    from .backbones.loading import load_backbone_weights
    factory = resolve_model if get_model is None else get_model
    device = torch.device("cpu" if device is None else device)
    # The network's own fp16 flag must be on under CUDA autocast too: arcface_torch backbones wrap
    # their trunk in ``autocast(enabled=self.fp16)``, which would switch the hook's autocast off.
    # Off elsewhere (bundled backbones would run their trunk in bfloat16 on a CPU) and for other
    # dtypes: the hook's own autocast then covers the whole network.
    network_fp16 = bool(fp16) and device.type == "cuda" and autocast_dtype in (None, torch.float16)
    model = factory(network, num_features=embedding_size, fp16=network_fp16)
    load_backbone_weights(model, checkpoint, network, config_key="teacher_network")
    return TeacherHook(model, device=device, fp16=fp16, embedding_size=embedding_size,
                       network=network, checkpoint=os.path.abspath(checkpoint),
                       autocast_dtype=autocast_dtype)
