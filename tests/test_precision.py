"""The GPU recipe's precision and memory branches run on the CPU (engine/precision.py): float16
autocast + GradScaler("cpu") with the found-inf decision shared by real gloo ranks, channels_last,
the teacher under float16 autocast, pin_memory requested where it is a no-op, and a whole
2-process training run on that path with a resume."""
import copy
import math
import os
import warnings

import pytest
import torch
from torch import nn

from data.dataset import (FaceRecordDataset, ResumableDistributedSampler, can_pin_memory,
                          make_loader)
from engine.precision import (AMP_DTYPES, drop_scaled_step, precision_plan, step_scaled,
                              unscale_gradients)
from engine.step_guard import StepGuard
from plugins.backbones import get_model
from plugins.teacher import TeacherHook, build_teacher
from tests.distributed_harness import run_distributed
from tests.training_helpers import job_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "recordio", "insightface_style")
CPU_GPU_RECIPE = {"fp16": True, "amp_dtype": "float16", "channels_last": True}


def _images(n=4, seed=1):
    return torch.randn(n, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def _conv_input_dtypes(model):
    """Record the input dtype of every Conv2d call of ``model``."""
    seen = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda m, inp, out: seen.append(inp[0].dtype))
    return seen


# ------------------------------------------------------------------ the plan

def test_plan_chooses_by_device_and_config():
    auto_cpu = precision_plan("cpu", {"fp16": True})
    assert auto_cpu.autocast_dtype == torch.bfloat16 and not auto_cpu.use_scaler
    assert auto_cpu.backbone_fp16 is True and auto_cpu.channels_last is False
    assert auto_cpu.teacher_dtype is None
    assert not auto_cpu.grad_scaler().is_enabled()

    forced = precision_plan("cpu", CPU_GPU_RECIPE)
    assert forced.autocast_dtype == torch.float16 and forced.use_scaler
    assert forced.backbone_fp16 == torch.float16       # differs from the CPU default: the dtype
    assert forced.teacher_dtype == torch.float16 and forced.channels_last
    scaler = forced.grad_scaler(init_scale=64.0)
    assert scaler.is_enabled() and scaler._device == "cpu"

    # what the CUDA run plans (only the plan: no CUDA here to build a scaler on)
    gpu = precision_plan(torch.device("cuda", 0), {"fp16": True})
    assert gpu.autocast_dtype == torch.float16 and gpu.use_scaler
    assert gpu.backbone_fp16 is True and gpu.channels_last and gpu.device_type == "cuda"
    assert precision_plan("cuda", {"fp16": True, "amp_dtype": "bfloat16"}).use_scaler is False

    fp32 = precision_plan("cpu", {"fp16": False, "amp_dtype": "float16"})
    assert fp32.autocast_dtype is None and fp32.backbone_fp16 is False
    assert not fp32.grad_scaler().is_enabled()
    assert fp32.teacher_dtype == torch.float16       # teacher_fp16 is a separate switch
    assert precision_plan("cpu", {"channels_last": False, "fp16": True,
                                  "amp_dtype": "float16"}).channels_last is False
    with pytest.raises(ValueError, match="'amp_dtype' must be one of"):
        precision_plan("cpu", {"fp16": True, "amp_dtype": "half"})
    assert set(AMP_DTYPES) == {"auto", "float16", "bfloat16"}


def test_amp_keys_are_config_keys_with_checked_values(workdir):
    cfg = job_config(workdir, "amp_keys", amp_dtype="float16", channels_last=True)
    assert cfg.amp_dtype == "float16" and cfg.channels_last is True
    with pytest.raises(ValueError, match="amp_dtype"):
        job_config(workdir, "amp_bad", amp_dtype="fp8")
    with pytest.raises(ValueError, match="channels_last"):
        job_config(workdir, "cl_bad", channels_last="yes")


# ------------------------------------------------------------------ student: float16, channels_last

def test_float16_channels_last_student_on_cpu_matches_fp32():
    plan = precision_plan("cpu", CPU_GPU_RECIPE)
    torch.manual_seed(0)
    reference = get_model("tiny_s", num_features=32).eval()   # fp32 (the head casts to float)
    student = get_model("tiny_s", num_features=32, fp16=plan.backbone_fp16)
    student.load_state_dict(reference.state_dict())
    student = plan.memory_format(student).eval()
    convs = [m for m in student.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    dtypes = _conv_input_dtypes(student)
    x = _images()
    batch = plan.memory_format(x)
    assert batch.is_contiguous(memory_format=torch.channels_last) and torch.equal(batch, x)
    got = student(batch)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert torch.float16 in dtypes                    # the trunk really ran in float16
    want = reference(x).double()
    cosine = nn.functional.cosine_similarity(got.double(), want)
    assert (cosine > 0.999).all(), cosine             # float16: 11-bit mantissa
    # fp32 channels_last (no autocast) equals the contiguous network to float rounding
    plain = get_model("tiny_s", num_features=32)
    plain.load_state_dict(student.state_dict())
    plain = plain.eval()
    last = precision_plan("cpu", {"channels_last": True}).memory_format(copy.deepcopy(plain))
    torch.testing.assert_close(last(batch), plain(x), rtol=1e-4, atol=1e-5)


def _scaled_step(scaler, opt, guard, clip_params, clip):
    """The trainer's step after the backward (engine.trainer.train_step): unscale, clip, the one
    read of the flags (all ranks agreeing when the guard's world > 1), step or skip."""
    found = unscale_gradients(scaler, opt)
    if clip > 0:
        nn.utils.clip_grad_norm_(clip_params, clip)
    flags, agreed = guard.read(found, None, 0)
    if flags.skip:
        drop_scaled_step(scaler, opt)
        return False
    return step_scaled(scaler, opt, flags.overflow, agreed)


def test_single_process_scaler_step_skips_on_overflow_and_backs_off():
    plan = precision_plan("cpu", CPU_GPU_RECIPE)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = plan.grad_scaler(init_scale=8.0, growth_interval=1000)
    guard = StepGuard(model, nn.Module(), torch.device("cpu"), 1)
    scaler.scale(model(torch.ones(1, 3)).sum()).backward()
    before = copy.deepcopy(model.state_dict())
    model.weight.grad[0, 0] = float("inf")
    assert _scaled_step(scaler, opt, guard, model.parameters(), 5.0) is False
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert scaler.get_scale() == 4.0
    opt.zero_grad()
    scaler.scale(model(torch.ones(1, 3)).sum()).backward()
    assert _scaled_step(scaler, opt, guard, model.parameters(), 0.0) is True
    # the unscaled gradient of sum(W x + b) with x = 1: every weight moves by -lr * 1
    torch.testing.assert_close(model.weight, before["weight"] - 0.1)
    assert scaler.state_dict()["_growth_tracker"] == 1       # GradScaler's own bookkeeping
    # a non-finite LOSS: the step is dropped and the scale stays (no back-off, tracker kept)
    opt.zero_grad()
    guard.begin()
    loss = model(torch.ones(1, 3)).sum() * float("nan")
    guard.loss(loss)
    scaler.scale(loss).backward()
    at = copy.deepcopy(model.state_dict())
    assert _scaled_step(scaler, opt, guard, model.parameters(), 5.0) is False
    assert all(torch.equal(at[k], v) for k, v in model.state_dict().items())
    assert scaler.get_scale() == 4.0 and scaler.state_dict()["_growth_tracker"] == 1
    guard.end()
    opt.zero_grad()           # the scaler accepts the next step (its record was dropped)
    scaler.scale(model(torch.ones(1, 3)).sum()).backward()
    assert _scaled_step(scaler, opt, guard, model.parameters(), 0.0) is True
    disabled = precision_plan("cpu", {"fp16": False}).grad_scaler()
    assert unscale_gradients(disabled, opt) is None


# ------------------------------------------------------------------ two ranks, one overflows

NUM_CLASSES, DIM, BATCH, OVERFLOW_STEP, STEPS = 10, 32, 4, 2, 5


def _fp16_steps(rank, world, share):
    """The trainer's step on the CPU float16 path: DDP tiny_s student + the real sharded margin
    head (its class shard is outside DDP).  Rank 1 alone gets an inf in its head-shard gradient at
    OVERFLOW_STEP.  Returns per step: stepped, scale after, and whether the weights moved."""
    import engine.precision as precision
    from torch.nn.parallel import DistributedDataParallel
    from plugins.heads import MarginSoftmaxHead

    plan = precision.precision_plan("cpu", CPU_GPU_RECIPE)
    torch.manual_seed(0)
    student = plan.memory_format(get_model("tiny_s", num_features=DIM, fp16=plan.backbone_fp16))
    torch.manual_seed(1 + rank)
    head = MarginSoftmaxHead(DIM, NUM_CLASSES, margin="cosface", s=16.0, m=0.2)
    model = DistributedDataParallel(student)
    params = list(student.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    scaler = plan.grad_scaler(init_scale=256.0, growth_interval=1000)
    # share=False: what the loop did before the found-inf all-reduce existed (per-rank decision)
    guard = StepGuard(student, head, torch.device("cpu"), world if share else 1)
    g = torch.Generator().manual_seed(100 + rank)
    records = []
    for step in range(STEPS):
        images = plan.memory_format(torch.randn(BATCH, 3, 112, 112, generator=g))
        labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
        loss = head(model(images).float(), labels)
        scaler.scale(loss).backward()
        if rank == 1 and step == OVERFLOW_STEP:
            head.weight.grad[0, 0] = float("inf")
        before = [p.detach().clone() for p in params]
        stepped = _scaled_step(scaler, opt, guard, student.parameters(), 5.0)
        opt.zero_grad(set_to_none=True)
        moved = [not torch.equal(b, p) for b, p in zip(before, params)]
        records.append({"stepped": stepped, "scale": scaler.get_scale(), "loss": loss.item(),
                        "student_moved": any(moved[:len(list(student.parameters()))]),
                        "head_moved": any(moved[len(list(student.parameters())):]),
                        "student": [p.detach().clone() for p in student.parameters()]})
    return records


def test_one_rank_overflow_makes_every_rank_skip_and_back_off_identically():
    ranks = run_distributed(_fp16_steps, 2, args=(True,))
    for step in range(STEPS):
        a, b = ranks[0][step], ranks[1][step]
        assert a["stepped"] == b["stepped"] and a["scale"] == b["scale"], step
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)   # the head's global-batch loss
        for p, q in zip(a["student"], b["student"]):               # replicas stay identical
            assert torch.equal(p, q), step
    at = [r[OVERFLOW_STEP] for r in ranks]
    before_scale = ranks[0][OVERFLOW_STEP - 1]["scale"]
    for r in at:
        assert r["stepped"] is False and not r["student_moved"] and not r["head_moved"]
        assert r["scale"] == before_scale * 0.5
    # the other steps are real steps (the test would notice an always-skipping scaler)
    assert all(r[s]["stepped"] and r[s]["student_moved"] and r[s]["head_moved"]
               for r in ranks for s in range(STEPS) if s != OVERFLOW_STEP)
    assert all(math.isfinite(r[s]["loss"]) for r in ranks for s in range(STEPS))


def test_without_the_shared_decision_the_ranks_would_diverge():
    """The control: with a per-rank decision only rank 1 skips -- what the all-reduce prevents."""
    ranks = run_distributed(_fp16_steps, 2, args=(False,))
    a, b = ranks[0][OVERFLOW_STEP], ranks[1][OVERFLOW_STEP]
    assert a["stepped"] and a["head_moved"] and not b["stepped"] and not b["head_moved"]
    assert a["scale"] == 2 * b["scale"]


# ------------------------------------------------------------------ teacher

def test_teacher_under_float16_autocast_on_cpu(tmp_path):
    torch.manual_seed(0)
    model = get_model("tiny_t", num_features=32)
    model.train()
    with torch.no_grad():
        model(_images(8, seed=3) * 2 + 0.3)                    # non-trivial BN statistics
    x = _images()
    want = copy.deepcopy(model).eval()(x).double()

    default = TeacherHook(copy.deepcopy(model), device="cpu", fp16=True)
    assert default.autocast_dtype is None and not default.autocast     # CPU teacher stays fp32
    torch.testing.assert_close(default(x).double(), want, rtol=1e-4, atol=1e-5)

    hook = TeacherHook(copy.deepcopy(model), device="cpu", fp16=True,
                       autocast_dtype=torch.float16, channels_last=True)
    assert hook.autocast and hook.autocast_dtype == torch.float16
    dtypes = _conv_input_dtypes(hook.model)
    got = hook(x)
    assert got.dtype == torch.float32 and not got.is_inference() and torch.float16 in dtypes
    cosine = nn.functional.cosine_similarity(got.double(), want)
    assert (cosine > 0.999).all(), cosine
    off = TeacherHook(copy.deepcopy(model), device="cpu", fp16=False, autocast_dtype=torch.float16)
    assert off.autocast_dtype is None

    # build_teacher (what the trainer and the cache build call) with the config's dtype
    path = tmp_path / "teacher.pt"
    torch.save(model.state_dict(), path)
    built = build_teacher("tiny_t", str(path), embedding_size=32, device="cpu", fp16=True,
                          autocast_dtype=AMP_DTYPES["float16"])
    assert built.model.fp16 is False        # the hook's float16 autocast covers the whole network
    dtypes = _conv_input_dtypes(built.model)
    torch.testing.assert_close(built(x), got, rtol=1e-3, atol=1e-3)
    assert torch.float16 in dtypes


# ------------------------------------------------------------------ pin_memory

def test_pin_memory_request_is_a_quiet_no_op_without_an_accelerator(monkeypatch):
    assert can_pin_memory() is False           # this machine: no CUDA, no other accelerator
    ds = FaceRecordDataset(FIXTURES, seed=5)
    batches = {}
    for pin in (True, False):
        sampler = ResumableDistributedSampler(len(ds), batch_size=4, num_replicas=1, rank=0,
                                              seed=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")           # torch warns when asked to pin without one
            loader = make_loader(ds, sampler, batch_size=4, num_workers=0, pin_memory=pin)
            batches[pin] = list(loader)
        assert loader.pin_memory is False
    assert len(batches[True]) == len(batches[False]) > 0
    for a, b in zip(batches[True], batches[False]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    # where an accelerator exists, the same line passes the request on
    monkeypatch.setattr("data.dataset.can_pin_memory", lambda: True)
    sampler = ResumableDistributedSampler(len(ds), batch_size=4, num_replicas=1, rank=0)
    assert make_loader(ds, sampler, batch_size=4, num_workers=0, pin_memory=True).pin_memory


# ------------------------------------------------------------------ the whole loop

def _train(rank, world, cfg):
    from engine.trainer import train
    return train(cfg)


def test_two_process_training_on_the_float16_scaler_path_resumes(workdir):
    common = dict(distill="gkd", max_steps=4, save_every=2, frequent=1, batch_size=8,
                  num_epoch=10, teacher_fp16=True, **CPU_GPU_RECIPE)
    cfg = job_config(workdir, "fp16_gkd", **common)
    first = run_distributed(_train, 2, args=(cfg,))
    assert first[0]["steps"] == 4 and first[0]["skipped_steps"] == 0
    assert first[1]["losses"] == pytest.approx(first[0]["losses"])
    assert all(math.isfinite(v) for v in first[0]["losses"])
    log = open(os.path.join(cfg.output, "training.log")).read()
    assert "student trunk float16 + GradScaler('cpu'), channels_last True" in log
    assert "Fp16 Grad Scale" in log
    ckpt = os.path.join(cfg.output, "checkpoints", "step_000000004", "common.pt")
    saved = torch.load(ckpt, weights_only=True)["scaler"]
    assert saved and saved["scale"] > 0          # the CPU GradScaler's state is checkpointed

    resumed_cfg = job_config(workdir, "fp16_gkd", resume=True, **dict(common, max_steps=6))
    second = run_distributed(_train, 2, args=(resumed_cfg,))
    assert second[0]["steps"] == 6 and len(second[0]["losses"]) == 2
    log = open(os.path.join(cfg.output, "training.log")).read()
    assert "resumed from" in log and "step 4" in log
