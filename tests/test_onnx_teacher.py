"""An insightface ONNX recognition model as the teacher (teacher_network = "onnx"): our tiny_t
exported by eval/onnx_export.py is the teacher; its cache equals the torch teacher's, training
from it runs through train_distill.py, the .onnx digest guards the cache, and the input
convention is read as insightface reads it and refused when it does not fit our images."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from engine.config import get_config
from data.dataset import FaceRecordDataset
from eval.model_io import load_backbone
from eval.onnx_export import export_onnx
from engine.teacher_cache_build import build_from_config
from engine.trainer import train
from plugins.onnx_teacher import OnnxTeacher, read_input_convention
from plugins.teacher import build_teacher
from plugins.teacher_cache import EMBEDDINGS_FILE, META_FILE
from tests.training_helpers import REPO, job_config

DIM = 512  # job_config's embedding_size / teacher_embedding_size (configs/base.py)


def _export(workdir, name, perturb=0.0):
    """The workdir's trained tiny_t teacher as ``name``.onnx (weights optionally shifted)."""
    path = str(workdir / f"{name}.onnx")
    if not os.path.isfile(path):
        model = load_backbone(str(workdir / "teacher.pt"), "tiny_t", DIM)
        with torch.no_grad():
            next(model.parameters()).add_(perturb)
        export_onnx(model, path)
    return path


@pytest.fixture(scope="module")
def onnx_teacher(workdir):
    return _export(workdir, "teacher")


@pytest.fixture(scope="module")
def onnx_cache(workdir, onnx_teacher):
    """A float32 teacher cache built from the ONNX teacher by the config path."""
    path = str(workdir / "onnx_cache")
    cfg = job_config(workdir, "onnx_cache_build", teacher_network="onnx",
                     teacher_checkpoint=onnx_teacher, teacher_cache=path)
    build_from_config(cfg, dtype="float32")
    return path


def _cosine_error(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((torch.nn.functional.cosine_similarity(a, b, dim=-1) - 1).abs().max())


# --- the cache ------------------------------------------------------------------------------

def test_onnx_cache_equals_the_torch_teachers_embeddings(workdir, onnx_teacher, onnx_cache):
    torch_teacher = build_teacher("tiny_t", str(workdir / "teacher.pt"), embedding_size=DIM)
    dataset = FaceRecordDataset(str(workdir / "data"), flip=False)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    reference = torch.stack([torch_teacher(images),
                             torch_teacher(torch.flip(images, dims=[3]))], dim=1)  # [N, 2, D]
    cached = np.load(os.path.join(onnx_cache, EMBEDDINGS_FILE))
    assert cached.shape == (len(dataset), 2, DIM) and cached.dtype == np.float32
    assert _cosine_error(cached, reference) < 1e-5
    assert not np.allclose(cached[:, 0], cached[:, 1])     # the mirrors differ: slots are real
    meta = json.load(open(os.path.join(onnx_cache, META_FILE)))
    with open(onnx_teacher, "rb") as handle:
        sha = hashlib.sha256(handle.read()).hexdigest()
    assert meta["teacher_digest"] == f"sha256:{sha}"
    assert meta["teacher_network"] == "onnx" and meta["complete"] is True


def test_cache_of_another_onnx_model_is_refused(workdir, onnx_cache):
    other = _export(workdir, "other_teacher", perturb=1e-3)
    cfg = job_config(workdir, "onnx_wrong_cache", distill="adadistill", max_steps=2,
                     teacher_network="onnx", teacher_checkpoint=other, teacher_cache=onnx_cache)
    with pytest.raises(ValueError, match="teacher_digest"):
        train(cfg)


def test_cache_of_the_torch_teacher_is_refused_for_its_onnx_export(workdir, onnx_teacher):
    path = str(workdir / "torch_cache_for_onnx")
    build_from_config(job_config(workdir, "torch_cache_build", teacher_cache=path))
    cfg = job_config(workdir, "onnx_torch_cache", distill="adadistill", max_steps=2,
                     teacher_network="onnx", teacher_checkpoint=onnx_teacher, teacher_cache=path)
    with pytest.raises(ValueError, match="teacher_digest") as err:
        train(cfg)
    assert "teacher_network" in str(err.value)


# --- training -------------------------------------------------------------------------------

def test_two_steps_through_train_distill_equal_the_torch_teachers_run(workdir, onnx_teacher,
                                                                    monkeypatch):
    import train_distill
    cfg = job_config(workdir, "onnx_online", distill="adadistill", max_steps=2,
                     teacher_network="onnx", teacher_checkpoint=onnx_teacher)
    monkeypatch.chdir(workdir)        # train_distill.py's main, in this process
    train_distill.main(["configs/onnx_online"])
    assert "finished: 2 steps" in open(os.path.join(cfg.output, "training.log")).read()
    torch_run = job_config(workdir, "onnx_online_torch_twin", distill="adadistill", max_steps=2)
    train(torch_run)
    got = torch.load(os.path.join(cfg.output, "model.pt"), weights_only=True)
    want = torch.load(os.path.join(torch_run.output, "model.pt"), weights_only=True)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)


def test_gkd_from_the_onnx_cache_uses_class_means(workdir, onnx_teacher, onnx_cache):
    cfg = job_config(workdir, "onnx_gkd", distill="gkd", max_steps=2, teacher_classifier=None,
                     teacher_network="onnx", teacher_checkpoint=onnx_teacher,
                     teacher_cache=onnx_cache)
    summary = train(cfg)
    assert summary["steps"] == 2 and all(np.isfinite(summary["losses"]))


# --- the input convention, as insightface reads it ------------------------------------------

def _graph(path, input_shape=("N", 3, 112, 112), dim=8, elem=TensorProto.FLOAT, outputs=1,
           output_shape=None, mxnet=False, seed=0):
    """A small recognition-like graph: [mxnet-style Sub/Mul,] GlobalAveragePool, Flatten,
    MatMul W [C, dim].  Returns W (float32 numpy)."""
    channels = input_shape[1] if len(input_shape) > 1 and isinstance(input_shape[1], int) else 3
    weight = np.random.default_rng(seed).standard_normal((channels, dim)).astype(np.float32)
    nodes, inits, x = [], [helper.make_tensor("W", TensorProto.FLOAT, weight.shape,
                                              weight.ravel())], "data"
    if mxnet:  # named as mxnet2onnx names them; the graph normalises pixels itself
        inits += [helper.make_tensor("m", TensorProto.FLOAT, [], [127.5]),
                  helper.make_tensor("s", TensorProto.FLOAT, [], [0.0078125])]
        nodes += [helper.make_node("Sub", [x, "m"], ["c"], name="_minus0"),
                  helper.make_node("Mul", ["c", "s"], ["n"], name="_mul0")]
        x = "n"
    nodes += [helper.make_node("GlobalAveragePool", [x], ["g"], name="pool"),
              helper.make_node("Flatten", ["g"], ["f"], name="flat"),
              helper.make_node("MatMul", ["f", "W"], ["fc1"], name="fc")]
    outs = [helper.make_tensor_value_info("fc1", TensorProto.FLOAT,
                                          list(output_shape or [input_shape[0], dim]))]
    for extra in range(1, outputs):
        nodes.append(helper.make_node("Identity", ["fc1"], [f"o{extra}"], name=f"id{extra}"))
        outs.append(helper.make_tensor_value_info(f"o{extra}", TensorProto.FLOAT, ["N", dim]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("data", elem,
                                                                         list(input_shape))],
                              outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return weight


def _rgb_faces(num, seed=0):
    """uint8 RGB faces [num, 112, 112, 3] and our normalised tensors [num, 3, 112, 112]."""
    pixels = np.random.default_rng(seed).integers(0, 256, (num, 112, 112, 3), dtype=np.uint8)
    tensors = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    return pixels, tensors


@pytest.mark.parametrize("mxnet", [False, True])
def test_normalisation_and_rgb_order_match_insightface(tmp_path, mxnet):
    """Our embedding of RGB tensor t = insightface's ArcFaceONNX.get_feat of the same face as a
    BGR uint8 image (cv2 blob, swapRB, its mean/std), and = a float64 re-derivation."""
    from insightface.model_zoo import get_model
    path = str(tmp_path / "rec.onnx")
    weight = _graph(path, dim=8, mxnet=mxnet)
    theirs = get_model(path)
    ours = OnnxTeacher(path, embedding_size=8)
    assert type(theirs).__name__ == "ArcFaceONNX"
    assert (ours.convention.input_mean, ours.convention.input_std) == \
        (theirs.input_mean, theirs.input_std) == ((0.0, 1.0) if mxnet else (127.5, 127.5))
    pixels, tensors = _rgb_faces(4)
    got = ours(tensors).numpy()
    want = theirs.get_feat([face[:, :, ::-1].copy() for face in pixels])   # BGR, as cv2 reads
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    graph_in = pixels.astype(np.float64).transpose(0, 3, 1, 2)              # RGB p in [0, 255]
    graph_in = (graph_in - 127.5) * 0.0078125 if mxnet else (graph_in - 127.5) / 127.5
    reference = graph_in.mean(axis=(2, 3)) @ weight.astype(np.float64)
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4)
    # a channel swap would change the answer (the check above is about order, not only scale)
    assert not np.allclose(ours(tensors.flip(1)).numpy(), got, atol=1e-3)


def test_fixed_batch_graph_runs_in_slices(tmp_path):
    path = str(tmp_path / "b1.onnx")
    _graph(path, input_shape=(1, 3, 112, 112), dim=6)
    _, tensors = _rgb_faces(3, seed=1)
    one = OnnxTeacher(path, embedding_size=6)
    assert one.convention.batch == 1
    path_n = str(tmp_path / "bn.onnx")
    _graph(path_n, dim=6)
    torch.testing.assert_close(one(tensors), OnnxTeacher(path_n, embedding_size=6)(tensors))


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_shape=("N", 3, 128, 128)), r"\[N, 3, 128, 128\].*112x112"),
    (dict(input_shape=("N", 1, 112, 112)), r"\[N, 1, 112, 112\].*1 channels"),
    (dict(input_shape=("N", 112, 112, 3)), r"\[N, 112, 112, 3\]"),
    (dict(input_shape=("N", 37632)), r"\[N, 37632\].*not an image batch \[N, 3, H, W\]"),
    (dict(input_shape=(1, 3, 112, 112, 1)), r"not an image batch"),
    (dict(input_shape=("N", 3, "H", "W")), r"input size is not fixed"),
    (dict(elem=TensorProto.UINT8), r"tensor\(uint8\).*float32 input"),
    (dict(outputs=2), r"1 input\(s\) and 2 output\(s\)"),
    (dict(output_shape=["N", 8, 1]), r"\[N, D\]"),
    (dict(dim=128), r"128-d embedding.*'teacher_embedding_size' = 8"),
])
def test_input_convention_errors_name_the_models_input(tmp_path, kwargs, match):
    path = str(tmp_path / "bad.onnx")
    _graph(path, **{"dim": 8, **kwargs})
    with pytest.raises(ValueError, match=match) as err:
        OnnxTeacher(path, embedding_size=8)
    assert path in str(err.value)


def test_unreadable_or_missing_files(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all \x00\xff" * 10)
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        read_input_convention(str(junk))
    with pytest.raises(FileNotFoundError, match="teacher_checkpoint"):
        build_teacher("onnx", str(tmp_path / "missing.onnx"))
    with pytest.raises(FileNotFoundError, match="teacher_checkpoint"):
        build_teacher("onnx", None)


def test_wrong_image_batch_is_refused_at_call(tmp_path):
    path = str(tmp_path / "rec.onnx")
    _graph(path)
    teacher = OnnxTeacher(path, embedding_size=8)
    with pytest.raises(ValueError, match=r"\[B, 3, 112, 112\], got \[2, 3, 96, 96\]"):
        teacher(torch.zeros(2, 3, 96, 96))


def test_symbolic_output_size_is_checked_at_call(tmp_path):
    path = str(tmp_path / "rec.onnx")
    _graph(path, dim=8, output_shape=["N", "D"])
    teacher = OnnxTeacher(path, embedding_size=16)          # D unknown until it runs
    with pytest.raises(RuntimeError, match=r"returned shape \[2, 8\].*expected \[2, 16\]"):
        teacher(torch.zeros(2, 3, 112, 112))
    assert OnnxTeacher(path, embedding_size=8)(torch.zeros(2, 3, 112, 112)).shape == (2, 8)


@pytest.mark.parametrize("network, checkpoint, match", [
    ("onnx", "teacher.pt", "teacher_network = 'onnx' needs the teacher's .onnx"),
    ("r50", "w600k_r50.onnx", "set teacher_network = 'onnx'"),
])
def test_config_keys_go_together(workdir, network, checkpoint, match):
    with pytest.raises(ValueError, match=match):
        job_config(workdir, "onnx_keys", teacher_network=network,
                   teacher_checkpoint=str(workdir / checkpoint))


def test_example_config_loads():
    cfg = get_config("configs/example_onnx_w600k_r50_adadistill", root=REPO)
    assert cfg.teacher_network == "onnx" and cfg.teacher_checkpoint.endswith(".onnx")


def test_plugin_imports_without_onnx_and_says_what_is_missing(tmp_path):
    """plugins/ stays torch/numpy/stdlib at import time; building the teacher without onnxruntime
    names the package to install."""
    path = str(tmp_path / "rec.onnx")
    _graph(path)
    code = ("import sys; sys.modules['onnx'] = None; sys.modules['onnxruntime'] = None\n"
            "import plugins.onnx_teacher as m, plugins.teacher\n"
            "try:\n    m.OnnxTeacher(sys.argv[1])\nexcept ImportError as e:\n    print(e)\n")
    run = subprocess.run([sys.executable, "-c", code, path], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "teacher_network='onnx' needs the 'onnx' package: pip install onnx" in run.stdout


def test_providers_cuda_when_available_on_the_runs_gpu(monkeypatch):
    import onnxruntime

    from plugins.onnx_teacher import default_providers
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert default_providers(torch.device("cuda", 3)) == [
        ("CUDAExecutionProvider", {"device_id": 3}), "CPUExecutionProvider"]
    assert default_providers(torch.device("cpu")) == ["CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert default_providers(torch.device("cuda", 0)) == ["CPUExecutionProvider"]
