"""The frozen teacher hook, its builder and the embedding-size check (plugins/teacher.py)."""
import copy
import hashlib

import pytest
import torch
from torch import nn

from plugins.backbones import resolve_model
from plugins.heads import check_embedding_sizes
from plugins.teacher import (TeacherHook, build_teacher, file_digest,
                             state_dict_digest)

DIM = 32


def _trained_like_tiny_t(seed: int = 0) -> nn.Module:
    """tiny_t with non-trivial BatchNorm statistics: train and eval mode give different outputs."""
    torch.manual_seed(seed)
    model = resolve_model("tiny_t", num_features=DIM)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 112, 112) * 2 + 0.3)
    return model


def _images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def test_hook_freezes_and_equals_eval_forward():
    model = _trained_like_tiny_t()
    reference = copy.deepcopy(model).eval()
    hook = TeacherHook(model)
    parent = nn.ModuleDict({"teacher": hook, "student": nn.Linear(2, 2)})
    parent.train()  # what a trainer does every epoch: must not reach the teacher
    assert parent["student"].training
    assert not hook.training and not any(m.training for m in hook.model.modules())
    assert not any(p.requires_grad for p in hook.parameters())
    x = _images()
    stats_before = hook.model.bn.running_mean.clone()
    out = hook(x)
    with torch.no_grad():
        expected = reference(x)
        in_train_mode = copy.deepcopy(reference).train()(x)
    assert out.dtype == torch.float32 and out.shape == (3, DIM)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert (out - in_train_mode).abs().max() > 1e-3  # eval mode really matters here
    assert torch.equal(hook.model.bn.running_mean, stats_before)  # no BN update
    # not L2-normalised: the heads normalise
    assert not torch.allclose(out.norm(dim=1), torch.ones(3))
    assert not out.is_inference() and not out.requires_grad


def test_hook_output_can_enter_a_student_backward():
    hook = TeacherHook(_trained_like_tiny_t())
    x = _images(2)
    student = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, DIM))
    f_t = hook.teacher_embeddings(x, torch.tensor([0, 1]), torch.tensor([False, True]))
    torch.testing.assert_close(f_t, hook(x), rtol=0, atol=0)
    f_s = student(x)
    # the product saves f_t for its backward pass
    loss = -(f_s * f_t).sum(dim=1).mean()
    loss.backward()
    grad = student[2].weight.grad.clone()
    student.zero_grad()
    constant = f_t.detach().clone()
    (-(student(x) * constant).sum(dim=1).mean()).backward()
    torch.testing.assert_close(grad, student[2].weight.grad, rtol=0, atol=0)
    # the failure the hook avoids: a raw inference tensor cannot be saved for backward
    with torch.inference_mode():
        raw = hook.model(x)
    with pytest.raises(RuntimeError, match="Inference tensors"):
        (-(student(x) * raw).sum(dim=1).mean()).backward()


def test_hook_cpu_options_and_output_check():
    model = _trained_like_tiny_t()
    x = _images(2)
    plain = TeacherHook(copy.deepcopy(model), fp16=True)
    assert plain.autocast is False and plain.channels_last is False  # CUDA only
    last = TeacherHook(copy.deepcopy(model), channels_last=True)
    assert last.channels_last
    torch.testing.assert_close(last(x), plain(x), rtol=1e-4, atol=1e-4)
    wrong = TeacherHook(copy.deepcopy(model), embedding_size=DIM + 1, network="tiny_t")
    with pytest.raises(RuntimeError,
                       match=r"tiny_t returned shape \(2, 32\).*teacher_embedding_size"):
        wrong(x)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        plain(x[0])


def test_hook_precision_under_an_enclosing_autocast():
    """An fp32 teacher stays fp32 (bit for bit) inside a caller's autocast region; a teacher with
    an autocast dtype runs exactly the model under that autocast, inside a region or not."""
    model = _trained_like_tiny_t()
    reference = copy.deepcopy(model).eval()
    x = _images(2)
    with torch.no_grad():
        fp32 = reference(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = reference(x).float()
    assert (fp32 - bf16).abs().max() > 0  # the autocast really changes the numbers
    hook = TeacherHook(copy.deepcopy(model))
    half = TeacherHook(copy.deepcopy(model), fp16=True, autocast_dtype=torch.bfloat16)
    assert half.autocast_dtype == torch.bfloat16 and hook.autocast_dtype is None
    for region in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=region):
            got, got_half = hook(x), half(x)
        assert torch.is_autocast_enabled("cpu") is False  # contexts left as found
        torch.testing.assert_close(got, fp32, rtol=0, atol=0)
        torch.testing.assert_close(got_half, bf16, rtol=0, atol=0)
        assert got.dtype == got_half.dtype == torch.float32
        assert not got.is_inference() and not got_half.is_inference()


def test_check_embedding_sizes():
    for method in ("adadistill", "arcdistill", "cosdistill", "feature_mse"):
        check_embedding_sizes(method, 512, 512)
        with pytest.raises(ValueError, match=rf"distill='{method}'.*embedding_size=128 \(student\)"
                                             rf".*teacher_embedding_size=512"):
            check_embedding_sizes(method, 128, 512)
    check_embedding_sizes("gkd", 128, 512)
    check_embedding_sizes("kd", 128, 512)        # a registered comparison method (issue 17)
    with pytest.raises(ValueError, match="unknown method 'kdx'"):
        check_embedding_sizes("kdx", 512, 512)


def test_build_teacher_loads_the_checkpoint(tmp_path):
    model = _trained_like_tiny_t(seed=3).eval()
    path = tmp_path / "teacher.pt"
    torch.save(model.state_dict(), path)
    teacher = build_teacher("tiny_t", str(path), embedding_size=DIM)
    assert (teacher.network, teacher.embedding_size) == ("tiny_t", DIM)
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), model(x), rtol=0, atol=0)
    assert teacher.digest == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    # an in-memory teacher is identified by its weights
    assert TeacherHook(model).digest == state_dict_digest(model)
    assert state_dict_digest(model) != state_dict_digest(_trained_like_tiny_t(seed=4))


def test_build_teacher_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher_checkpoint"):
        build_teacher("tiny_t", str(tmp_path / "missing.pt"), embedding_size=DIM)
    with pytest.raises(FileNotFoundError, match="teacher_checkpoint"):
        build_teacher("tiny_t", None, embedding_size=DIM)
    student_weights = tmp_path / "student.pt"
    torch.save(resolve_model("tiny_s", num_features=DIM).state_dict(), student_weights)
    with pytest.raises(ValueError):
        build_teacher("tiny_t", str(student_weights), embedding_size=DIM)


def test_file_digest_reads_in_blocks(tmp_path):
    data = torch.randint(0, 256, (9 * (1 << 20) + 7,), dtype=torch.uint8).numpy().tobytes()
    path = tmp_path / "blob"
    path.write_bytes(data)  # more than two 4 MiB blocks
    assert file_digest(str(path)) == "sha256:" + hashlib.sha256(data).hexdigest()
