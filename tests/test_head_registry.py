"""The head registry: a head registered from this file trains through train_distill.py's code path
(engine.trainer.train) with no other file touched; every registered head builds from a config and
runs one forward/backward under the common contract."""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import get_config
from plugins.builders import check_config
from plugins.config_defaults import CHOICES, DISTILL_DEFAULTS, KEY_TYPES
from plugins.distributed import all_reduce_sum_with_grad
from plugins.heads import (DistillHead, build_head, check_embedding_sizes, head_names, head_spec,
                           register_head)
from plugins.heads.base import margin_from_config
from tests.training_helpers import NUM_IDS, job_config, train_capturing_head

TOY = "toy_cosine_kd"


@register_head(TOY, needs_teacher=True, same_dim=True, keys={
    "toy_weight": (0.5, "toy head: weight of 1 - cos(f_s, f_t)", (int, float)),
    "toy_mode": ("mean", "toy head: reduction", (str,), ("mean",))})
class ToyCosineHead(DistillHead):
    """A learned scale times the mean of 1 - cos(f_s, f_t) over the global batch."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = float(weight)
        self.scale = nn.Parameter(torch.ones(()))   # replicated on every rank
        self.reduce_calls = 0

    @classmethod
    def from_config(cls, cfg, teacher_classifier=None):
        return cls(cfg.toy_weight)

    def forward(self, student, labels, teacher=None, epoch=0.0):
        teacher = self.require_teacher(teacher)
        cos = F.cosine_similarity(student.float(), teacher.float(), dim=1)
        count = all_reduce_sum_with_grad(torch.tensor(float(student.shape[0])))
        loss = self.weight * self.scale * all_reduce_sum_with_grad((1 - cos).sum()) / count
        self.stats = {"toy_cos": cos.detach().mean()}
        return loss

    def reduce_replicated_grads(self):
        self.reduce_calls += 1


def test_registry_flags_keys_and_errors():
    spec = head_spec(TOY)
    assert spec.cls is ToyCosineHead and spec.needs_teacher and spec.same_dim
    assert spec.teacher_classifier == "no" and spec.summary.startswith("A learned scale")
    # the config tables follow the registry (no second place to type a key)
    assert DISTILL_DEFAULTS["toy_weight"][0] == 0.5 and KEY_TYPES["toy_weight"] == (int, float)
    assert CHOICES["toy_mode"] == ("mean",) and TOY in CHOICES["distill"]
    assert head_spec("gkd").teacher_classifier == "or_class_means"
    assert not head_spec("gkd").same_dim and head_spec("gkd").keys["gkd_k"][0] == 10000
    assert head_spec("arcdistill").teacher_classifier == "required"
    assert head_spec("adadistill").teacher_classifier == "optional"
    assert not head_spec("none").needs_teacher
    assert "feature_kd_weight" in head_spec("feature_mse").keys
    with pytest.raises(ValueError, match=r"unknown method 'gdk' -- did you mean 'gkd'\?; valid "
                                         r"names: adadistill, "):
        head_spec("gdk")
    with pytest.raises(ValueError, match="teacher_classifier must be one of"):
        register_head("bad", needs_teacher=False, teacher_classifier="maybe")
    with pytest.raises(ValueError, match=r"keys\['k'\] must be \(default, description"):
        register_head("bad", needs_teacher=False, keys={"k": (1, "no types")})
    with pytest.raises(TypeError, match="no from_config"):
        register_head("bad", needs_teacher=False)(nn.Module)
    assert "bad" not in head_names()
    check_embedding_sizes("gkd", 128, 512)
    with pytest.raises(ValueError, match=r"distill='toy_cosine_kd'.*embedding_size=128"):
        check_embedding_sizes(TOY, 128, 512)


def test_registering_a_name_twice_warns_and_the_later_wins():
    @register_head("toy_twice", needs_teacher=False)
    class First(DistillHead):
        pass

    with pytest.warns(RuntimeWarning, match="'toy_twice' is registered twice"):
        @register_head("toy_twice", needs_teacher=False)
        class Second(DistillHead):
            pass
    assert head_spec("toy_twice").cls is Second


def test_margin_from_config():
    cfg = {"margin_list": (1.0, 0.0, 0.4), "margin_scale": 32.0}

    class Cfg(dict):
        __getattr__ = dict.__getitem__
    assert margin_from_config(Cfg(cfg)) == ("cosface", 0.4, 32.0)
    assert margin_from_config(Cfg(cfg, margin_list=[1.0, 0.5, 0.0])) == ("arcface", 0.5, 32.0)
    for bad in ((1.0, 0.5, 0.4), (1.35, 0.0, 0.0), (1.0, 0.5)):
        with pytest.raises(ValueError, match="margin_list"):
            margin_from_config(Cfg(cfg, margin_list=bad))


def test_a_toy_head_registered_here_trains_two_steps(workdir):
    cfg = job_config(workdir, "toy_head", distill=TOY, toy_weight=2.0, max_steps=2,
                     frequent=1, embedding_size=512)
    assert cfg.toy_weight == 2.0 and cfg.toy_mode == "mean"   # accepted and defaulted
    check_config(cfg)
    summary, head, _ = train_capturing_head(cfg)
    assert type(head) is ToyCosineHead and head.weight == 2.0
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    assert all(0.0 <= loss <= 4.0 for loss in summary["losses"])     # 2 * (1 - cos)
    assert head.reduce_calls == 2                                     # once per optimizer step
    assert head.scale.item() != 1.0                                   # the optimizer trained it
    log = open(os.path.join(cfg.output, "training.log")).read()
    assert "toy_cos" in log and "Global Step: 2" in log
    assert not os.path.exists(os.path.join(cfg.output, "classifier.pt"))   # none learned
    # a typo in the toy's key is refused with the closest name
    (workdir / "configs" / "toy_typo.py").write_text(
        "from easydict import EasyDict as edict\nconfig = edict()\nconfig.toy_wieght = 1.0\n")
    with pytest.raises(ValueError, match="did you mean 'toy_weight'"):
        get_config("configs/toy_typo", root=str(workdir))


@pytest.mark.parametrize("name", head_names())
def test_every_registered_head_builds_and_steps(workdir, name):
    """A shrunk config (16 classes, D = 512, tiny teacher classifier) -> build_head -> one
    forward/backward with the common call; the contract's attributes hold."""
    spec = head_spec(name)
    margin = (1.0, 0.5, 0.0) if name == "arcdistill" else (1.0, 0.0, 0.35)
    cfg = job_config(workdir, f"every_{name}", distill=name, margin_list=margin,
                     sample_rate=0.5 if name in ("none", "gkd") else 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head = build_head(cfg)
    assert isinstance(head, DistillHead) and isinstance(head, spec.cls)
    torch.manual_seed(0)
    d_t = cfg.teacher_embedding_size
    student = torch.randn(8, cfg.embedding_size, requires_grad=True)
    labels = torch.randint(0, NUM_IDS, (8,))
    teacher = torch.randn(8, d_t) if spec.needs_teacher else None
    loss = head(student, labels, teacher=teacher, epoch=1.0)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    head.reduce_replicated_grads()
    assert head.stats and all(isinstance(v, torch.Tensor) and not v.requires_grad
                              for v in head.stats.values())
    state, buffers = head.state_dict(), dict(head.named_buffers())
    assert set(head.sharded_keys) <= set(state) and set(head.frozen_keys) <= set(buffers)
    table = head.learned_classifier()
    assert table is None or tuple(table.shape) == (NUM_IDS, cfg.embedding_size)
    if spec.needs_teacher:
        with pytest.raises(ValueError, match="teacher"):
            head(student, labels, teacher=None)


def test_fork_loop_sums_replicated_grads_once_per_backward():
    """The patched train_v2.py path (plugins.fork_loop.fork_head_loss) calls the head's
    reduce_replicated_grads after the backward that ends the step, and refuses gradient_acc > 1
    for a head with replicated parameters (its loop has no hook between accumulation steps)."""
    from easydict import EasyDict
    from plugins.fork_loop import fork_head_loss, replicated_parameters

    head = ToyCosineHead(1.0)
    assert replicated_parameters(head) == ("scale",)
    assert replicated_parameters(build_head(EasyDict(
        distill="none", embedding_size=4, num_classes=3, margin_list=(1.0, 0.0, 0.4),
        margin_scale=8.0, sample_rate=1.0))) == ()

    class Teacher:
        def teacher_embeddings(self, images, index, flipped):
            return images * 2.0

    cfg = EasyDict(distill=TOY, gradient_acc=1)
    backbone = nn.Linear(4, 4)
    images = torch.randn(5, 4)
    emb = backbone(images)
    loss = fork_head_loss(head, cfg, backbone, Teacher(), images, emb, torch.arange(5), 0)
    assert head.reduce_calls == 0
    loss.backward()
    assert head.reduce_calls == 1 and head.scale.grad is not None
    cfg.gradient_acc = 2
    with pytest.raises(ValueError, match=r"replicated on every rank \(scale\).*gradient_acc = 1"):
        fork_head_loss(head, cfg, backbone, Teacher(), images, backbone(images),
                       torch.arange(5), 0)


@pytest.mark.parametrize("sizes", [(0, 10), (8, 0)])
def test_class_sharded_heads_refuse_empty_sizes_by_name(sizes):
    """DistillHead.own_class_shard: the one size check of every head with per-class rows."""
    from plugins.heads.adadistill import AdaDistillHead
    from plugins.heads.gkd import GKDHead
    from plugins.heads.margin_softmax import MarginSoftmaxHead
    embedding_size, num_classes = sizes
    builders = {
        "AdaDistillHead": lambda: AdaDistillHead(embedding_size, num_classes),
        "MarginSoftmaxHead": lambda: MarginSoftmaxHead(embedding_size, num_classes),
        "GKDHead": lambda: GKDHead(embedding_size, num_classes,
                                   torch.zeros(num_classes, 4), margin="cosface",
                                   teacher_embedding_size=4),
    }
    for name, build in builders.items():
        with pytest.raises(ValueError, match=rf"{name}: embedding_size and num_classes must be "
                                             rf">= 1, got {embedding_size} and {num_classes}"):
            build()
