"""An insightface ONNX recognition model (e.g. ``buffalo_l/w600k_r50.onnx``) as the frozen teacher.

Config: ``teacher_network = "onnx"`` and ``teacher_checkpoint = "<file>.onnx"``.  The model runs
with onnxruntime (CUDA provider when onnxruntime has it and the run's device is a GPU, the CPU
provider otherwise); ``onnx`` and ``onnxruntime`` are imported only when an ONNX teacher is
built, so ``plugins/`` stays importable with torch and numpy alone.

Input convention, read the way insightface 2.1's ``model_zoo.get_model("<file>.onnx")`` reads a
plain ONNX file (``ModelRouter`` -> ``ArcFaceONNX``):

* the input size is the graph input's ``[N, C, H, W]`` (``ArcFaceONNX.input_size = (W, H)``);
  the router calls a model a recognition model when it has fewer than 5 outputs and
  ``H == W >= 112``, ``H % 16 == 0``; ``ArcFaceONNX`` requires exactly one output ``[N, D]``;
* pixels: ``cv2.dnn.blobFromImages(bgr, 1 / std, size, (mean,) * 3, swapRB=True)``, i.e. the
  graph receives RGB ``(p - mean) / std`` for pixel values ``p`` in [0, 255];
* ``mean = 0, std = 1`` when the first 8 graph nodes include both a node whose name starts with
  ``Sub``/``_minus`` and one starting with ``Mul``/``_mul`` (mxnet-converted models carry their
  normalisation inside the graph); ``mean = std = 127.5`` otherwise.

Our images are RGB tensors ``t = (p / 255 - 0.5) / 0.5 = (p - 127.5) / 127.5``, so the graph input
is the affine map ``(127.5 * t + 127.5 - mean) / std`` of them -- the identity for
``mean = std = 127.5`` (then ``t`` is passed unchanged).  ``check_input_convention`` refuses, at
start-up, a model whose input is not ``[N, 3, 112, 112]`` float, or whose output is not ``[N, D]``
with the configured ``D``, naming what the model expects.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .teacher import file_digest

ONNX_NETWORK = "onnx"           # the config value of ``teacher_network`` for an ONNX teacher
IMAGE_SHAPE = (3, 112, 112)     # our dataset's images: RGB, 112 x 112
PIXEL_CENTER = 127.5            # our tensors are (p - 127.5) / 127.5
_SUB_PREFIXES = ("Sub", "_minus")
_MUL_PREFIXES = ("Mul", "_mul")
_FLOAT = 1                      # onnx.TensorProto.FLOAT
Dim = Union[int, str, None]     # a fixed size, a symbolic name, or unknown


def _import(name: str):
    """``onnx`` / ``onnxruntime``, with a clear error when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"teacher_network='onnx' needs the '{name}' package: "
                          f"pip install {name} (onnxruntime-gpu for CUDA); see "
                          f"requirements.txt") from err


@dataclass(frozen=True)
class OnnxInputConvention:
    """What an ONNX recognition model expects, as insightface's ``ArcFaceONNX`` reads it.

    Attributes:
        path: the ``.onnx`` file.
        input_name / output_name: the graph's (only) input and output.
        input_shape: the input's dimensions, e.g. ``(None, 3, 112, 112)`` (a symbolic or unknown
            batch size is ``None`` or its name); ``()`` means rank 0 / unknown.
        output_shape: the output's dimensions, e.g. ``(None, 512)``.
        input_type: the input's ONNX element type name, e.g. ``"tensor(float)"``.
        num_inputs / num_outputs: counts of real graph inputs (initializers excluded) / outputs.
        input_mean / input_std: insightface's pixel normalisation ``(p - mean) / std``.
    """

    path: str
    input_name: str
    output_name: str
    input_shape: Tuple[Dim, ...]
    output_shape: Tuple[Dim, ...]
    input_type: str
    num_inputs: int
    num_outputs: int
    input_mean: float
    input_std: float

    def describe(self) -> str:
        """``"input 'data' [N, 3, 112, 112] tensor(float), RGB (p - 127.5) / 127.5"``."""
        dims = ", ".join(str(d) if isinstance(d, int) else "N" if i == 0 else str(d or "?")
                         for i, d in enumerate(self.input_shape))
        return (f"input '{self.input_name}' [{dims}] {self.input_type}, RGB pixels "
                f"(p - {self.input_mean:g}) / {self.input_std:g}")

    @property
    def batch(self) -> Optional[int]:
        """A fixed batch size of the graph, or None when it is dynamic."""
        first = self.input_shape[0] if self.input_shape else None
        return first if isinstance(first, int) else None

    @property
    def embedding_size(self) -> Optional[int]:
        """The output's fixed feature size ``D``, or None when it is symbolic."""
        last = self.output_shape[-1] if len(self.output_shape) == 2 else None
        return last if isinstance(last, int) else None


def _dims(value_info) -> Tuple[Dim, ...]:
    shape = value_info.type.tensor_type.shape
    return tuple(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None)
                 for d in shape.dim)


def read_input_convention(path: str) -> OnnxInputConvention:
    """Read the input convention of the ONNX file ``path`` (graph only; no session is made).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a loadable ONNX model, or has no input or output.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config key 'teacher_checkpoint': ONNX teacher {path!r} not "
                                f"found; point it at the recognition model's .onnx file (e.g. "
                                f"~/.insightface/models/buffalo_l/w600k_r50.onnx)")
    onnx = _import("onnx")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as err:  # protobuf DecodeError and friends
        raise ValueError(f"{path}: not a loadable ONNX model ({err})") from err
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]  # old exports list weights
    if not inputs or not graph.output:
        raise ValueError(f"{path}: the graph has {len(inputs)} input(s) and "
                         f"{len(graph.output)} output(s); a recognition model has one of each")
    names = [node.name for node in graph.node[:8]]
    embedded = (any(n.startswith(_SUB_PREFIXES) for n in names)
                and any(n.startswith(_MUL_PREFIXES) for n in names))
    mean, std = (0.0, 1.0) if embedded else (PIXEL_CENTER, PIXEL_CENTER)
    elem = inputs[0].type.tensor_type.elem_type
    type_name = onnx.helper.tensor_dtype_to_string(elem).replace("TensorProto.", "").lower()
    return OnnxInputConvention(
        path=os.path.abspath(path), input_name=inputs[0].name, output_name=graph.output[0].name,
        input_shape=_dims(inputs[0]), output_shape=_dims(graph.output[0]),
        input_type="tensor(float)" if elem == _FLOAT else f"tensor({type_name})",
        num_inputs=len(inputs), num_outputs=len(graph.output), input_mean=mean, input_std=std)


def check_input_convention(conv: OnnxInputConvention,
                           image_shape: Sequence[int] = IMAGE_SHAPE,
                           embedding_size: Optional[int] = None) -> None:
    """Refuse a model that cannot embed our images ``[B, 3, 112, 112]`` into ``[B, D]``.

    Args:
        conv: from ``read_input_convention``.
        image_shape: our dataset's ``(3, H, W)``.
        embedding_size: the configured ``teacher_embedding_size``; checked when the model's
            output size is fixed (otherwise on every forward).

    Raises:
        ValueError: naming the model's expected input (or output) and what we have.
    """
    channels, height, width = (int(v) for v in image_shape)
    ours = f"our dataset's images are {channels}x{height}x{width} RGB"
    where = f"ONNX teacher {conv.path}"
    if conv.num_inputs != 1 or conv.num_outputs != 1:
        raise ValueError(f"{where} has {conv.num_inputs} input(s) and {conv.num_outputs} "
                         f"output(s); insightface's ArcFaceONNX (a recognition model) has one "
                         f"image input and one embedding output -- is this a detector or "
                         f"another insightface model?  Use the pack's recognition .onnx file")
    shape = conv.input_shape
    expects = f"the model expects {conv.describe()}"
    if len(shape) != 4:
        raise ValueError(f"{where}: {expects}, not an image batch [N, 3, H, W]; {ours}")
    if conv.input_type != "tensor(float)":
        raise ValueError(f"{where}: {expects}; a float32 input is needed (insightface feeds "
                         f"float32 blobs to recognition models)")
    if shape[1] != channels:
        raise ValueError(f"{where}: {expects} ({shape[1]} channels); {ours}")
    size = shape[2:]
    if not all(isinstance(d, int) for d in size):
        raise ValueError(f"{where}: {expects}: its input size is not fixed, so insightface's "
                         f"model_zoo cannot read it as a recognition model; {ours}")
    if tuple(size) != (height, width):
        raise ValueError(f"{where}: {expects}, i.e. {size[0]}x{size[1]} faces; {ours}: use a "
                         f"{height}x{width} recognition model, or train on "
                         f"{size[0]}x{size[1]} data")
    if conv.batch is not None and conv.batch < 1:
        raise ValueError(f"{where}: {expects}: batch size {conv.batch} is invalid")
    out = conv.output_shape
    if len(out) != 2:
        raise ValueError(f"{where}: its output '{conv.output_name}' has shape "
                         f"{list(out)}; a recognition model returns embeddings [N, D]")
    if embedding_size is not None and conv.embedding_size not in (None, embedding_size):
        raise ValueError(f"{where} returns {conv.embedding_size}-d embedding, config key "
                         f"'teacher_embedding_size' = {embedding_size}: set it to "
                         f"{conv.embedding_size}")


def default_providers(device: torch.device) -> List[Union[str, Tuple[str, dict]]]:
    """onnxruntime providers: CUDA (on ``device``'s GPU) when ``device`` is CUDA and onnxruntime
    has the CUDA provider, then CPU."""
    ort = _import("onnxruntime")
    providers: List[Union[str, Tuple[str, dict]]] = []
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.append(("CUDAExecutionProvider", {"device_id": device.index or 0}))
    providers.append("CPUExecutionProvider")
    return providers


class OnnxTeacher(nn.Module):
    """A frozen ONNX recognition model mapping our images ``[B, 3, 112, 112]`` to ``[B, D]`` fp32.

    Offers what the trainer and the cache build use of ``plugins.teacher.TeacherHook``: calling
    it, ``teacher_embeddings(images, index, flipped)``, ``device``, ``digest`` (sha256 of the
    .onnx file), ``network`` (``"onnx"``), ``checkpoint``, ``embedding_size``.  It has no torch
    parameters; ``train()`` is a no-op.

    Args:
        path: the ``.onnx`` file.
        embedding_size: expected ``D`` (``teacher_embedding_size``); checked at start-up and on
            every call.
        device: where embeddings are returned (and, when CUDA, which GPU onnxruntime uses).
        providers: onnxruntime providers; default ``default_providers(device)``.
        image_shape: our images' ``(3, H, W)``, checked against the model at start-up.
        num_threads: CPU provider threads; default ``torch.get_num_threads()`` (the run's budget).

    Raises:
        FileNotFoundError / ValueError: from ``read_input_convention`` / ``check_input_convention``
            (a model that does not fit our images), or onnxruntime cannot load the file.
    """

    def __init__(self,
                 path: str,
                 embedding_size: Optional[int] = None,
                 device: Optional[Union[torch.device, str]] = None,
                 providers: Optional[Sequence[Union[str, Tuple[str, dict]]]] = None,
                 image_shape: Sequence[int] = IMAGE_SHAPE,
                 num_threads: Optional[int] = None) -> None:
        super().__init__()
        self.convention = read_input_convention(path)
        check_input_convention(self.convention, image_shape, embedding_size)
        self.image_shape = tuple(int(v) for v in image_shape)
        self.embedding_size = embedding_size
        self.network = ONNX_NETWORK
        self.checkpoint = self.convention.path
        self.fp16 = False
        self._device = torch.device("cpu" if device is None else device)
        self._digest: Optional[str] = None
        ort = _import("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(num_threads or torch.get_num_threads())
        providers = list(default_providers(self._device) if providers is None else providers)
        try:
            self.session = ort.InferenceSession(self.checkpoint, options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception classes
            raise ValueError(f"ONNX teacher {self.checkpoint}: onnxruntime cannot load it "
                             f"({err})") from err
        conv = self.convention
        # Our tensor t = (p - 127.5) / 127.5  ->  graph input (p - mean) / std = scale * t + shift
        self.scale = PIXEL_CENTER / conv.input_std
        self.shift = (PIXEL_CENTER - conv.input_mean) / conv.input_std
        self.train(False)

    def train(self, mode: bool = True) -> "OnnxTeacher":
        """Ignore ``mode``: the teacher is frozen."""
        self.training = False
        return self

    @property
    def device(self) -> torch.device:
        """Where embeddings are returned."""
        return self._device

    @property
    def providers(self) -> List[str]:
        """The onnxruntime providers the session actually uses, in priority order."""
        return list(self.session.get_providers())

    @property
    def digest(self) -> str:
        """``"sha256:<hex>"`` of the .onnx file (the teacher cache records it), computed once."""
        if self._digest is None:
            self._digest = file_digest(self.checkpoint)
        return self._digest

    def model_input(self, images: torch.Tensor) -> np.ndarray:
        """The graph input for our normalised RGB ``images [B, 3, H, W]``: float32 numpy of
        ``(p - mean) / std`` (``images`` themselves when mean = std = 127.5)."""
        blob = images.detach().to("cpu", torch.float32)
        if (self.scale, self.shift) != (1.0, 0.0):
            blob = blob * self.scale + self.shift
        return np.ascontiguousarray(blob.numpy())

    def _run(self, blob: np.ndarray) -> np.ndarray:
        conv = self.convention
        fixed = conv.batch
        if fixed is None or fixed == blob.shape[0]:
            return self.session.run([conv.output_name], {conv.input_name: blob})[0]
        parts = []  # a graph with a fixed batch size: run it in slices, the last zero-padded
        for start in range(0, blob.shape[0], fixed):
            part = blob[start:start + fixed]
            pad = fixed - part.shape[0]
            if pad:
                part = np.concatenate([part, np.zeros((pad,) + part.shape[1:], part.dtype)])
            out = self.session.run([conv.output_name], {conv.input_name: part})[0]
            parts.append(out[:fixed - pad])
        return np.concatenate(parts)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher embeddings ``f_t [B, D]`` (fp32, not normalised) of ``images [B, 3, H, W]``."""
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            shape = ", ".join(map(str, self.image_shape))
            raise ValueError(f"OnnxTeacher expects images [B, {shape}], got "
                             f"{list(images.shape)}")
        out = self._run(self.model_input(images))
        expect = self.embedding_size
        if out.ndim != 2 or out.shape[0] != images.shape[0] or (
                expect is not None and out.shape[1] != expect):
            raise RuntimeError(f"ONNX teacher {self.checkpoint} returned shape {list(out.shape)} "
                               f"for {images.shape[0]} images; expected [{images.shape[0]}, "
                               f"{expect or 'D'}] -- check config key teacher_embedding_size")
        return torch.from_numpy(np.array(out, dtype=np.float32)).to(self._device)

    def teacher_embeddings(self, images: torch.Tensor, index: torch.Tensor,
                           flipped: torch.Tensor) -> torch.Tensor:
        """The common "teacher embedding source" call; ``index``/``flipped`` are unused."""
        return self(images)


def build_onnx_teacher(checkpoint: Optional[str],
                       embedding_size: Optional[int] = 512,
                       device: Optional[Union[torch.device, str]] = None) -> OnnxTeacher:
    """The teacher of ``teacher_network = "onnx"``: ``OnnxTeacher(teacher_checkpoint, ...)``.

    Raises:
        FileNotFoundError: ``checkpoint`` is None or missing.
        ValueError: not an ``.onnx`` file, or a model that does not fit our images / D.
    """
    if checkpoint is None or not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"config key 'teacher_checkpoint' = {checkpoint!r}: file not "
                                f"found; with teacher_network='onnx' it must name the teacher's "
                                f".onnx recognition model")
    if not checkpoint.lower().endswith(".onnx"):
        raise ValueError(f"config key 'teacher_checkpoint' = {checkpoint!r}: teacher_network="
                         f"'onnx' needs a .onnx file")
    return OnnxTeacher(checkpoint, embedding_size=embedding_size, device=device)
