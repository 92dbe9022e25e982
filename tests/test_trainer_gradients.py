"""Our trainer (engine/trainer.py) gives the student the same gradient on 1 and 2 gloo ranks for
GKD (the config that used to select the removed 1/W mode): the gradient of the global-batch mean
loss, summed over ranks by the exact-gradient comm hook.

Same global batch (8 images of 8 distinct classes, no flips), same student weights, the GKD
student classifier started from the same [C, D] table on any W (the trainer seeds its shards per
rank), a student without BatchNorm (per-rank batch statistics would change the forward).  The
gradient the trainer hands to ``clip_grad_norm_`` is captured there.  Control: with DDP's plain
average instead of the hook, 2 ranks give half of it.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests.distributed_harness import run_distributed
from tests.training_helpers import REPO

NUM_CLASSES, DIM, GLOBAL_BATCH = 16, 32, 8


class _Captured(Exception):
    pass


class _PlainNet(torch.nn.Module):
    """[B, 3, 112, 112] -> [B, num_features] without BatchNorm."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 4, 1), torch.nn.PReLU(8),
                                        torch.nn.Conv2d(8, 16, 3, 4, 1), torch.nn.PReLU(16))
        self.fc = torch.nn.Linear(16 * 7 * 7, num_features)

    def forward(self, x):
        return self.fc(torch.flatten(self.body(x), 1))


def _plain_net(num_features: int = 512, fp16: bool = False) -> torch.nn.Module:
    return _PlainNet(num_features)


def _trainer_gradient(rank, world, cfg, table, exact):
    import engine.trainer
    from plugins.backbones import list_models, register_model
    if "plain_test" not in list_models():
        register_model("plain_test")(_plain_net)
    plain_build = engine.trainer.build_head

    def build_head(*args, **kwargs):   # the student classifier: rows of one table on any W
        head = plain_build(*args, **kwargs)
        with torch.no_grad():
            head.weight.copy_(table[head.class_start:head.class_start + head.num_local])
        return head

    engine.trainer.build_head = build_head
    if not exact:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        engine.trainer.exact_gradient_hook = allreduce_hook   # DDP's own average
    captured = {}

    def capture(parameters, max_norm, *args, **kwargs):
        captured["grad"] = torch.cat([p.grad.detach().flatten().double() for p in parameters])
        raise _Captured

    torch.nn.utils.clip_grad_norm_ = capture
    cfg = type(cfg)(dict(cfg, batch_size=GLOBAL_BATCH // world,
                         output=os.path.join(cfg.output, f"w{world}_{int(exact)}")))
    try:
        engine.trainer.train(cfg)
    except _Captured:
        return captured["grad"]
    raise AssertionError("the trainer never reached clip_grad_norm_")


@pytest.fixture(scope="module")
def gkd_setup(tmp_path_factory):
    from engine.config import get_config
    from tools.synthetic import write_train_set
    from plugins.backbones import get_model
    root = tmp_path_factory.mktemp("trainer_gkd")
    write_train_set(str(root / "data"), num_ids=NUM_CLASSES, images_per_id=1, seed=6)
    torch.manual_seed(1)
    torch.save(get_model("tiny_t", num_features=DIM).state_dict(), root / "teacher.pt")
    torch.save(torch.randn(NUM_CLASSES, DIM), root / "classifier.pt")
    (root / "configs").mkdir()
    shutil.copy(os.path.join(REPO, "configs", "base.py"), root / "configs" / "base.py")
    (root / "configs" / "gkd.py").write_text(f'''\
from easydict import EasyDict as edict
config = edict()
config.distill = "gkd"
config.network = "tiny_s"   # replaced by plain_test in the ranks (registered there)
config.embedding_size = {DIM}
config.teacher_network = "tiny_t"
config.teacher_checkpoint = {str(root / "teacher.pt")!r}
config.teacher_classifier = {str(root / "classifier.pt")!r}
config.teacher_embedding_size = {DIM}
config.margin_list = (1.0, 0.0, 0.4)
config.gkd_k = 4
config.gkd_warmup_epochs = 0
config.rec = {str(root / "data")!r}
config.num_classes = {NUM_CLASSES}
config.num_image = {NUM_CLASSES}
config.num_epoch = 1
config.warmup_epoch = 0
config.batch_size = {GLOBAL_BATCH}
config.flip = False
config.fp16 = False
config.nesterov = True
config.lr_schedule = "cosine"
config.num_workers = 0
config.val_targets = []
config.output = {str(root / "out")!r}
''')
    cfg = get_config("configs/gkd", root=str(root))
    cfg.network = "plain_test"
    torch.manual_seed(2)
    return cfg, torch.randn(NUM_CLASSES, DIM) * 0.01


def test_gkd_trainer_gradient_is_the_same_on_1_and_2_ranks(gkd_setup):
    cfg, table = gkd_setup
    one = run_distributed(_trainer_gradient, 1, args=(cfg, table, True))[0]
    two = run_distributed(_trainer_gradient, 2, args=(cfg, table, True))
    assert torch.equal(two[0], two[1])
    assert float(one.abs().max()) > 1e-4
    assert float((two[0] - one).abs().max()) <= 1e-5 * float(one.abs().max())
    averaged = run_distributed(_trainer_gradient, 2, args=(cfg, table, False))[0]
    assert float((averaged - one / 2).abs().max()) <= 1e-5 * float(one.abs().max())
