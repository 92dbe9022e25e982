"""The comparison methods of both papers as registered heads (issue 17): flags and keys, the
paper-recipe job configs, a 2-step run through train_distill.py's code path, and world-size
invariance of each head (loss, student gradient, replicated-parameter gradients, class-shard
gradients) on 1 vs 2 gloo processes.  The float64 re-derivations of the terms themselves are in
tests/test_kd_terms_math.py (not repeated here)."""
import os

import pytest
import torch
from easydict import EasyDict

from engine.checkpoint import CheckpointManager
from engine.config import get_config
from plugins.builders import check_config
from plugins.distributed import shard_range
from plugins.heads import (DistillHead, MarginPlusKD, build_head, check_embedding_sizes,
                           head_spec)
from plugins.margin import distributed_margin_cross_entropy
from tests.distributed_harness import run_distributed
from tests.training_helpers import NUM_IDS, job_config, train_capturing_head

HEADS = ["kd", "fitnet", "angular", "rkd", "sp", "cckd", "ekd", "margin_distillation"]
# name -> (teacher_classifier, same_dim, {key: default}, the paper config it derives from)
EXPECTED = {
    "kd": ("or_class_means", False, {"kd_temperature": 4.0, "kd_weight": 1.0,
                                     "kd_warmup_epochs": 0}, "ms1mv2_mbf_gkd"),
    "fitnet": ("no", False, {"fitnet_weight": 1.0, "fitnet_normalize": True,
                             "fitnet_scale": 0.5, "fitnet_regressor": "auto"}, "ms1mv2_mbf_gkd"),
    "angular": ("no", True, {"angular_weight": 1.0}, "ms1mv2_mbf_adadistill"),
    "rkd": ("no", False, {"rkd_weight": 1.0, "rkd_distance_weight": 25.0,
                          "rkd_angle_weight": 50.0}, "ms1mv2_mbf_gkd"),
    "sp": ("no", False, {"sp_weight": 1.0, "sp_gram": "cosine"}, "ms1mv2_mbf_adadistill"),
    "cckd": ("no", False, {"cckd_weight": 1.0, "cckd_gamma": 0.4, "cckd_order": 2},
             "ms1mv2_mbf_adadistill"),
    "ekd": ("no", False, {"ekd_weight": 1.0, "ekd_top_k": 2000, "ekd_temperature": 0.01,
                          "ekd_momentum": 0.01, "ekd_positive_weight": 0.02,
                          "ekd_negative_weight": 0.01}, "ms1mv2_mbf_adadistill"),
    "margin_distillation": ("required", True, {"md_m_min": 0.2, "md_m_max": 0.5},
                            "ms1mv2_mbf_adadistill"),
}
# what each recipe changes on top of its paper config, besides distill and its own keys
RECIPE_CHANGES = {"ekd": {"margin_list": (1.0, 0.4, 0.0), "lr_steps": (10, 18, 22)},
                  "margin_distillation": {
                      "margin_list": (1.0, 0.5, 0.0), "margin_grad": "exact",
                      "teacher_classifier": "work_dirs/ms1mv2_r50_arcface_teacher/classifier.pt"}}


@pytest.mark.parametrize("name", HEADS)
def test_registered_flags_keys_and_docstring(name):
    teacher_classifier, same_dim, keys, _ = EXPECTED[name]
    spec = head_spec(name)
    assert spec.needs_teacher and spec.teacher_classifier == teacher_classifier
    assert spec.same_dim == same_dim
    assert {k: v[0] for k, v in spec.keys.items()} == keys
    assert all(v[1].startswith(f"{name}: ") for v in spec.keys.values())   # descriptions
    module = __import__(spec.cls.__module__, fromlist=["_"])
    assert "math::" in module.__doc__ and "github.com" in module.__doc__   # equation + source
    if same_dim:
        with pytest.raises(ValueError, match="same size"):
            check_embedding_sizes(name, 128, 512)
    else:
        check_embedding_sizes(name, 128, 512)


@pytest.mark.parametrize("name", HEADS)
def test_paper_recipe_config_derives_from_its_paper_config(name):
    cfg = get_config(f"configs/ms1mv2_mbf_{name}")
    parent = get_config(f"configs/{EXPECTED[name][3]}")
    assert cfg.distill == name
    for key, default in EXPECTED[name][2].items():
        assert cfg[key] == default, key
    changes = RECIPE_CHANGES.get(name, {})
    for key, value in changes.items():
        assert tuple(cfg[key]) == value if isinstance(value, tuple) else cfg[key] == value
    own = set(EXPECTED[name][2]) | set(changes) | {"distill", "output", "config_name"}
    differs = {k for k in set(cfg) | set(parent) if k not in own and cfg.get(k) != parent.get(k)}
    assert not differs, differs
    doc = open(os.path.join("configs", f"ms1mv2_mbf_{name}.py")).read().split('"""')[1]
    assert any(src in doc for src in ("GKD", "TFace", "margindistillation", "AdaDistill"))


def test_kd_refuses_an_arcface_margin():
    cfg = EasyDict(distill="kd", margin_list=(1.0, 0.5, 0.0), margin_scale=64.0)
    with pytest.raises(ValueError, match="CosFace"):
        head_spec("kd").cls.check_config(cfg)


def test_per_sample_margin_equals_scalar_margin_and_mixes_rows():
    """distributed_margin_cross_entropy with a constant [N] m equals the float m; row i of a mixed
    m equals the scalar result of that row alone."""
    torch.manual_seed(0)
    cos = torch.rand(5, 7) * 1.6 - 0.8
    target = torch.tensor([0, 3, 6, 2, 2])
    for kind in ("arcface", "cosface"):
        scalar = distributed_margin_cross_entropy(cos, target, kind, 16.0, 0.3)
        per = distributed_margin_cross_entropy(cos, target, kind, 16.0, torch.full((5,), 0.3))
        torch.testing.assert_close(per.loss, scalar.loss, rtol=0, atol=0)
        m = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
        mixed = distributed_margin_cross_entropy(cos, target, kind, 16.0, m).loss
        rows = [distributed_margin_cross_entropy(cos[i:i + 1], target[i:i + 1], kind, 16.0,
                                                 float(m[i])).loss for i in range(5)]
        torch.testing.assert_close(mixed, torch.stack(rows).mean())
    with pytest.raises(ValueError, match="per-sample margins"):
        distributed_margin_cross_entropy(cos, target, "arcface", 16.0, torch.zeros(4))


@pytest.mark.parametrize("name", HEADS)
def test_two_training_steps_through_the_trainer(workdir, name):
    """train_distill.py's code path (engine.trainer.train) on the shrunk synthetic set: 2 steps,
    finite losses, the head's stats logged, its replicated state in the final checkpoint."""
    extra = {"fitnet": {"fitnet_regressor": "always"}, "ekd": {"ekd_top_k": 20}}.get(name, {})
    cfg = job_config(workdir, f"cmp_{name}", distill=name, max_steps=2, frequent=1, **extra)
    check_config(cfg)
    summary, head, initial = train_capturing_head(cfg)
    assert isinstance(head, head_spec(name).cls) and isinstance(head, DistillHead)
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    assert all(torch.isfinite(torch.tensor(loss)) and loss > 0 for loss in summary["losses"])
    log = open(os.path.join(cfg.output, "training.log")).read()
    assert "Global Step: 2" in log and all(key in log for key in head.stats)
    _, _, shards = CheckpointManager(cfg.output).load_latest()
    saved = shards[0]["head"]
    assert set(saved) == set(head.state_dict())
    for key, value in head.state_dict().items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0)
    if name == "fitnet":   # the replicated regressor is trained by the optimizer and saved
        assert "term.regressor.weight" in saved
        assert not torch.equal(saved["term.regressor.weight"], initial["term.regressor.weight"])
    if name == "ekd":      # the replicated EMA thresholds moved and are saved
        assert float(saved["term.student_thresholds"].abs().sum()) > 0
        assert not initial["term.student_thresholds"].any()
    if name in ("kd", "margin_distillation"):
        assert "teacher_weight" in head.frozen_keys


# ---- world-size invariance of the heads: 1 process vs 2 gloo processes (one spawn) ----------

N, C, D = 8, 10, 6
LABELS = [0, 0, 1, 9, 1, 3, 3, 4]


def _cfg(name):
    same = head_spec(name).same_dim
    cfg = EasyDict(distill=name, embedding_size=D, teacher_embedding_size=D if same else D + 2,
                   num_classes=C, margin_list=(1.0, 0.0, 0.3), margin_scale=8.0,
                   sample_rate=1.0, margin_grad="exact", teacher_classifier=None)
    for key, spec in head_spec(name).keys.items():
        cfg[key] = spec[0]
    cfg.update({"fitnet_regressor": "always", "ekd_top_k": 10, "ekd_temperature": 0.1,
                "kd_warmup_epochs": 4})
    if name == "margin_distillation":
        cfg.margin_list = (1.0, 0.4, 0.0)
    return cfg


def _data():
    g = torch.Generator().manual_seed(1)
    return {"s": torch.randn(N, D, generator=g), "t": torch.randn(N, D + 2, generator=g),
            "t_same": torch.randn(N, D, generator=g), "tw": torch.randn(C, D + 2, generator=g),
            "tw_same": torch.randn(C, D, generator=g), "w": torch.randn(C, D, generator=g),
            "labels": torch.tensor(LABELS)}


def _heads_worker(rank, world, data):
    b = N // world
    rows = slice(rank * b, (rank + 1) * b)
    start, num = shard_range(C, rank, world)
    out = {}
    for name in HEADS:
        cfg = _cfg(name)
        same = head_spec(name).same_dim
        table = data["tw_same"] if same else data["tw"]
        torch.manual_seed(7)                       # replicated params: the same on every rank
        head = build_head(cfg, teacher_classifier=table)
        with torch.no_grad():
            for key, p in head.named_parameters():
                if key in head.sharded_keys:       # the class shard of a full table
                    p.copy_(data["w"][start:start + num])
        teacher = (data["t_same"] if same else data["t"])[rows]
        out[name] = {}
        for step in range(2):                      # 2 steps: EKD's thresholds carry over
            s = (data["s"][rows] + 0.1 * step).clone().requires_grad_(True)
            head.zero_grad()
            loss = head(s, data["labels"][rows], teacher=teacher, epoch=1.0)
            loss.backward()
            head.reduce_replicated_grads()
            grads = {k: p.grad.clone() for k, p in head.named_parameters() if p.grad is not None}
            out[name][step] = {"loss": loss.detach(), "grad": s.grad,
                               "param_grads": grads,
                               "buffers": {k: v.clone() for k, v in head.named_buffers()
                                           if k not in head.sharded_keys}}
    return out


@pytest.fixture(scope="module")
def head_runs():
    data = _data()
    return {1: [_heads_worker(0, 1, data)], 2: run_distributed(_heads_worker, 2, (data,))}


TOL = dict(rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("name", HEADS)
def test_head_is_world_size_invariant(head_runs, name):
    one, two = head_runs[1][0][name], [r[name] for r in head_runs[2]]
    for step in (0, 1):
        ref = one[step]
        assert float(ref["grad"].abs().sum()) > 0
        for rank_out in two:
            torch.testing.assert_close(rank_out[step]["loss"], ref["loss"], **TOL)
            for key, value in ref["buffers"].items():     # replicated buffers (EKD thresholds)
                torch.testing.assert_close(rank_out[step]["buffers"][key], value, **TOL)
        torch.testing.assert_close(torch.cat([r[step]["grad"] for r in two]), ref["grad"], **TOL)
        head_cls = head_spec(name).cls
        sharded = set(getattr(head_cls, "sharded_keys", ()))
        if issubclass(head_cls, MarginPlusKD):
            sharded = {"margin_head.weight"}
        for key, value in ref["param_grads"].items():
            if key in sharded:                             # class shards, in rank order
                got = torch.cat([r[step]["param_grads"][key] for r in two])
                torch.testing.assert_close(got, value, **TOL)
            else:                                          # replicated: summed, same everywhere
                for rank_out in two:
                    torch.testing.assert_close(rank_out[step]["param_grads"][key], value, **TOL)
    if name == "fitnet":
        assert "term.regressor.weight" in one[0]["param_grads"]
    if name == "ekd":
        assert float(one[1]["buffers"]["term.student_thresholds"].abs().sum()) > 0


def _train_fitnet(rank, world, cfg):
    from engine.trainer import train
    summary = train(cfg)
    _, _, shards = CheckpointManager(cfg.output).load_latest()
    head = shards[0]["head"]
    return {"losses": summary["losses"], "regressor": head["term.regressor.weight"],
            "classes": head["margin_head.weight"].shape[0]}


def test_fitnet_regressor_stays_replicated_on_two_trainer_processes(workdir):
    """The real trainer on 2 gloo ranks: the replicated regressor's summed gradients keep it
    identical on both ranks (it would drift apart with per-rank gradients), the class shards
    split the classes, the loss is the same on both ranks."""
    cfg = job_config(workdir, "cmp_fitnet_w2", distill="fitnet", fitnet_regressor="always",
                     max_steps=3)
    ranks = run_distributed(_train_fitnet, 2, args=(cfg,))
    assert ranks[0]["losses"] == pytest.approx(ranks[1]["losses"])
    torch.testing.assert_close(ranks[0]["regressor"], ranks[1]["regressor"], rtol=0, atol=0)
    assert ranks[0]["classes"] + ranks[1]["classes"] == NUM_IDS
