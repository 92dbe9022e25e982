"""ONNX export: torch vs onnxruntime, InsightFace loads it as a recognition model, the
ICCV21-MFR checks (passing and each failure), the CLI, and ONNX models in the evaluators."""
from __future__ import annotations

import os
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from eval import export_onnx as export_cli
from eval import onnx_export
from eval.model_io import OnnxEmbedder, TorchEmbedder, load_embedder
from plugins.backbones import get_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = get_model("tiny_s", num_features=512).eval()
    path = str(tmp_path_factory.mktemp("onnx") / "student.onnx")
    onnx_export.export_onnx(model, path)
    return model, path


def test_onnxruntime_matches_torch_and_batch_is_dynamic(exported):
    model, path = exported
    error = onnx_export.compare_with_torch(model, path, num_images=5)
    print(f"max |cos - 1| torch vs onnxruntime: {error:.3e}")
    assert error < 1e-4
    images = torch.randint(0, 256, (3, 3, 112, 112), dtype=torch.uint8)
    onnx_feats = load_embedder(path, None)(images)
    assert onnx_feats.shape == (3, 512) and onnx_feats.dtype == torch.float32
    torch_feats = TorchEmbedder(model, autocast=False)(images)
    np.testing.assert_allclose(onnx_feats.numpy(), torch_feats.numpy(), rtol=1e-3, atol=1e-4)
    # the comparison is sensitive: a wrong normalisation (x / 255 instead of (x - 127.5) / 127.5)
    # changes the embedding far beyond the tolerance
    wrong = OnnxEmbedder(path).session.run(None, {"input.1": images.numpy() / np.float32(255)})[0]
    cos = (wrong * torch_feats.numpy()).sum(1) / np.linalg.norm(wrong, axis=1) / \
        np.linalg.norm(torch_feats.numpy(), axis=1)
    assert np.abs(cos - 1).max() > 1e-3


def test_graph_layout_and_insightface_loads_it(exported):
    model, path = exported
    proto = onnx.load(path)
    (inp,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "input.1" and dims == ["None", 3, 112, 112]
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [13]
    ops = [n.op_type for n in proto.graph.node]
    assert set(ops[:ops.index("Conv")]) <= {"Identity"}   # normalisation is outside the graph
    info = onnx_export.check_insightface(model, path)
    assert info["class"] == "ArcFaceONNX" and info["taskname"] == "recognition"
    assert (info["input_mean"], info["input_std"]) == (127.5, 127.5)
    assert info["max_abs_cos_minus_1"] < 1e-4
    assert sorted(os.listdir(os.path.dirname(path))) == ["student.onnx"]   # no temp file left


def test_mfr_check_passes_for_the_export(exported):
    problems, facts = onnx_export.check_mfr(exported[1])
    assert problems == []
    assert facts["outputs"] == [("embedding", ["None", 512])] and facts["nodes"] >= 8
    assert facts["cpu_latency_ms"] > 0


def _toy_model(path, dtype=TensorProto.FLOAT, opset=13, outputs=1, nodes=8, dim=512,
               domain="", size=112, ir=7):
    """[N, 3, 112, 112] -> GlobalAveragePool -> Flatten -> Identity chain -> MatMul [3, dim]."""
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    weight = numpy_helper.from_array(np.zeros((3, dim), np_type), "w")
    chain = [helper.make_node("GlobalAveragePool", ["x"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f0"])]
    for i in range(nodes - 3):
        chain.append(helper.make_node("Identity", [f"f{i}"], [f"f{i + 1}"]))
    chain.append(helper.make_node("MatMul", [f"f{nodes - 3}", "w"], ["y"]))
    if domain:
        chain.append(helper.make_node("Custom", ["y"], ["z"], domain=domain))
    outs = [helper.make_tensor_value_info("z" if domain else "y", TensorProto.FLOAT, ["N", dim])]
    outs += [helper.make_tensor_value_info(f"f{i}", TensorProto.FLOAT, None)
             for i in range(outputs - 1)]
    graph = helper.make_graph(chain, "toy", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 3, size, size])], outs, [weight])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain
                                                  else [])
    onnx.save(helper.make_model(graph, opset_imports=imports, ir_version=ir), path)
    return path


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype=TensorProto.FLOAT16), r"initializer w is float16 \(weights must be float32\)"),
    (dict(opset=17), r"opset 17 > 13"),
    (dict(outputs=2), r"2 outputs, expected exactly 1"),
    (dict(nodes=4), r"only 4 graph nodes"),
    (dict(dim=256), r"output shape \['N', 256\], expected \[N, 512\]"),
    (dict(domain="com.example"), r"non-standard domains \['com.example'\]"),
    (dict(ir=8), r"IR version 8 > 7"),
    (dict(size=128), r"input shape \['N', 3, 128, 128\], expected"),
])
def test_mfr_check_reports_each_violation(tmp_path, kwargs, message):
    assert onnx_export.check_mfr(_toy_model(str(tmp_path / "ok.onnx")))[0] == []
    path = _toy_model(str(tmp_path / "toy.onnx"), **kwargs)
    problems, _ = onnx_export.check_mfr(path)
    assert any(re.search(message, p) for p in problems), problems


def test_cli_export_and_mfr_failure(exported, tmp_path, capsys):
    model, _ = exported
    torch.save(model.state_dict(), tmp_path / "model.pt")
    result = export_cli.main(["--model-prefix", str(tmp_path / "model.pt"), "--network", "tiny_s",
                              "--output", str(tmp_path / "out.onnx"), "--check-mfr"])
    out = capsys.readouterr().out
    assert "max |cos - 1|" in out and "ICCV21-MFR constraints: all met" in out
    assert result["cos_error"] < 1e-4 and result["mfr"]["problems"] == []
    with pytest.raises(SystemExit, match=r"checks failed: IR version 8 > 7 .*; opset 17 > 13"):
        export_cli.main(["--model-prefix", str(tmp_path / "model.pt"), "--network", "tiny_s",
                         "--output", str(tmp_path / "o17.onnx"), "--opset", "17", "--check-mfr"])
