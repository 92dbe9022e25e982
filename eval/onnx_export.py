"""Export a backbone to ONNX as InsightFace and the ICCV21-MFR server consume it, and check it.

The file: one float32 input ``input.1`` of shape ``[N, 3, 112, 112]`` (RGB, dynamic batch N),
one float32 output ``[N, D]``; the pixel normalisation ``(x - 127.5) / 127.5`` stays OUTSIDE the
graph (InsightFace's ``ArcFaceONNX`` applies ``input_mean = input_std = 127.5`` itself, and
decides so because the graph does not start with ``Sub``/``Mul`` nodes).  Exported with the
TorchScript exporter (``dynamo=False``: the torch.export-based one needs ``onnxscript``) at a
fixed opset, ``DEFAULT_OPSET = 13``: the highest that onnxruntime-gpu 1.6, the runtime of the
ICCV21-MFR evaluation server, supports.

ICCV21-MFR submission constraints (challenges/iccv21-mfr rules and arcface_torch's
``onnx_helper.py`` checker), checked by ``check_mfr``:

* model file <= 1 GB (1024 MiB); float16 (or any < 32-bit) weights are prohibited;
* input 3 x 112 x 112 RGB, one input (4-d, batch dimension free), one output;
* feature length <= 512 (track A, MS1M-V3) -- we require exactly the configured D;
* a real network (>= 8 graph nodes); standard ONNX operators only (default domain, opset <= 13
  and IR version <= 7, so onnxruntime 1.6 runs it); no data-dependent tricks such as an
  in-graph flip test (a rule of 2021-07-16; not detectable automatically, not checked);
* inference <= 10 ms per image on a V100 (track A) -- not checkable on this machine; the CPU
  latency is printed for information.
"""
from __future__ import annotations

import copy
import io
import os
import time
import warnings
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from plugins.atomic_io import atomic_output
from eval.model_io import OnnxEmbedder, TorchEmbedder

DEFAULT_OPSET = 13
MFR_MAX_OPSET = 13
MFR_MAX_IR_VERSION = 7      # onnxruntime 1.6 is built on ONNX 1.8: IR version 7
MFR_MAX_BYTES = 1024 * 1024 * 1024
MFR_MIN_NODES = 8
INPUT_NAME = "input.1"
OUTPUT_NAME = "embedding"
IMAGE_SIZE = 112


def export_onnx(backbone: nn.Module, output: str, opset: int = DEFAULT_OPSET,
                image_size: int = IMAGE_SIZE) -> str:
    """Write ``backbone`` (a CPU fp32 copy in eval mode) to ``output`` atomically; returns it.

    Args:
        backbone: ``[N, 3, S, S]`` normalised RGB -> ``[N, D]``.
        output: the ``.onnx`` path (written to a temporary name, checked, then renamed).
        opset: ONNX opset version (fixed, default 13; see module docstring).
        image_size: S.
    """
    import onnx

    model = copy.deepcopy(backbone).float().cpu().eval()
    dummy = torch.zeros(1, 3, image_size, image_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's own deprecation notices
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # input checks
        torch.onnx.export(model, (dummy,), buffer, dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "None"}, OUTPUT_NAME: {0: "None"}},
                          do_constant_folding=True)
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    with atomic_output(output) as handle:
        handle.write(buffer.getvalue())
    return output


def _random_faces(num: int, seed: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num, 3, size, size), generator=gen, dtype=torch.uint8)


def _max_cos_error(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.abs((a * b).sum(axis=1) - 1.0).max())


def compare_with_torch(backbone: nn.Module, path: str, num_images: int = 8,
                       seed: int = 0) -> float:
    """``max |cos(torch, onnxruntime) - 1|`` over random uint8 images (batch of ``num_images``,
    which also exercises the dynamic batch axis)."""
    images = _random_faces(num_images, seed)
    ref = TorchEmbedder(copy.deepcopy(backbone).float().cpu(), torch.device("cpu"),
                        autocast=False)(images).double().numpy()
    got = OnnxEmbedder(path, providers=["CPUExecutionProvider"])(images).double().numpy()
    if got.shape != ref.shape:
        raise RuntimeError(f"{path}: onnxruntime output {got.shape} != torch {ref.shape}")
    return _max_cos_error(ref, got)


def check_insightface(backbone: nn.Module, path: str, seed: int = 1) -> Dict[str, object]:
    """Load ``path`` with ``insightface.model_zoo.get_model`` and compare its ``get_feat`` on an
    aligned 112 x 112 BGR image with the torch backbone on the same RGB image.

    Raises RuntimeError unless it is a recognition model (``taskname == 'recognition'``) with
    ``input_mean == input_std == 127.5``.
    """
    from insightface import model_zoo

    model = model_zoo.get_model(path, providers=["CPUExecutionProvider"])
    taskname = getattr(model, "taskname", None)
    if taskname != "recognition":
        raise RuntimeError(f"{path}: insightface loads it as {type(model).__name__} with "
                           f"taskname {taskname!r}, expected a recognition model (ArcFaceONNX)")
    if (model.input_mean, model.input_std) != (127.5, 127.5):
        raise RuntimeError(f"{path}: insightface would feed it with mean/std "
                           f"{model.input_mean}/{model.input_std}, expected 127.5/127.5 (the "
                           f"graph must not start with Sub/Mul nodes)")
    rgb = _random_faces(1, seed)
    bgr = np.ascontiguousarray(rgb[0].numpy().transpose(1, 2, 0)[:, :, ::-1])
    got = np.asarray(model.get_feat(bgr), dtype=np.float64)
    ref = TorchEmbedder(copy.deepcopy(backbone).float().cpu(), torch.device("cpu"),
                        autocast=False)(rgb).double().numpy()
    return {"class": type(model).__name__, "taskname": taskname,
            "input_mean": model.input_mean, "input_std": model.input_std,
            "max_abs_cos_minus_1": _max_cos_error(ref, got)}


def _dims(value_info) -> List[object]:
    return [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None)
            for d in value_info.type.tensor_type.shape.dim]


def check_mfr(path: str, num_features: int = 512) -> Tuple[List[str], Dict[str, object]]:
    """ICCV21-MFR submission constraints (module docstring): ``(violations, facts)``.

    ``violations`` is empty when the file complies; ``facts`` holds what was measured (size,
    opset, shapes, node count, CPU latency of one image).
    """
    import onnx
    from onnx import TensorProto, numpy_helper

    problems: List[str] = []
    size = os.path.getsize(path)
    model = onnx.load(path)
    graph = model.graph
    init_names = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init_names]
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    facts: Dict[str, object] = {"size_mib": size / 2 ** 20, "opset": opsets,
                                "inputs": [(i.name, _dims(i)) for i in inputs],
                                "outputs": [(o.name, _dims(o)) for o in graph.output],
                                "nodes": len(graph.node)}
    if size > MFR_MAX_BYTES:
        problems.append(f"file is {size / 2 ** 20:.1f} MiB, limit 1024 MiB")
    if len(inputs) != 1:
        problems.append(f"{len(inputs)} inputs, expected exactly 1")
    else:
        dims = _dims(inputs[0])
        batch_ok = bool(dims) and (dims[0] in (1, None) or isinstance(dims[0], str))
        if len(dims) != 4 or dims[1:] != [3, IMAGE_SIZE, IMAGE_SIZE] or not batch_ok:
            problems.append(f"input shape {dims}, expected [N or 1, 3, 112, 112]")
        if inputs[0].type.tensor_type.elem_type != TensorProto.FLOAT:
            problems.append("input is not float32")
    if len(graph.output) != 1:
        problems.append(f"{len(graph.output)} outputs, expected exactly 1")
    else:
        dims = _dims(graph.output[0])
        if len(dims) != 2 or dims[1] != num_features:
            problems.append(f"output shape {dims}, expected [N, {num_features}]")
        if num_features > 512:
            problems.append(f"feature length {num_features} > 512 (track A limit)")
        if graph.output[0].type.tensor_type.elem_type != TensorProto.FLOAT:
            problems.append("output is not float32")
    if len(graph.node) < MFR_MIN_NODES:
        problems.append(f"only {len(graph.node)} graph nodes (the checker rejects < 8)")
    facts["ir_version"] = model.ir_version
    if model.ir_version > MFR_MAX_IR_VERSION:
        problems.append(f"IR version {model.ir_version} > {MFR_MAX_IR_VERSION} (onnxruntime 1.6 "
                        f"on the server)")
    if opsets.get("ai.onnx", 0) > MFR_MAX_OPSET:
        problems.append(f"opset {opsets['ai.onnx']} > {MFR_MAX_OPSET} (onnxruntime 1.6 on the "
                        f"server); export with --opset 13")
    foreign = sorted({n.domain for n in graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        problems.append(f"operators from non-standard domains {foreign}")
    for tensor in graph.initializer:
        dtype = numpy_helper.to_array(tensor).dtype
        if dtype.itemsize < 4 or (dtype.kind == "f" and dtype != np.float32):
            problems.append(f"initializer {tensor.name} is {dtype} (weights must be float32)")
            break
    if not problems:
        session = OnnxEmbedder(path, providers=["CPUExecutionProvider"])
        image = _random_faces(1, 0)
        session(image)
        costs = []
        for _ in range(10):
            start = time.perf_counter()
            session(image)
            costs.append(time.perf_counter() - start)
        facts["cpu_latency_ms"] = 1000 * sorted(costs)[len(costs) // 2]
    return problems, facts
