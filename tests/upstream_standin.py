'''A stand-in for upstream arcface_torch's training script and its Partial FC, written for the
tests (not copied): the same structure and the same gradient convention, on a CPU; and a stand-in
of each shape arcface_torch's training code had in upstream's history (``VINTAGES``).

What it keeps from upstream (deepinsight/insightface recognition/arcface_torch, read for facts):
- ``train_v2.py``: one process group per run, ``get_model`` backbone wrapped in DDP
  (``broadcast_buffers=False``, ``find_unused_parameters=True``) with ``fp16_compress_hook``
  registered and a static graph, ``CombinedMarginLoss(64, *margin_list, threshold)``,
  ``PartialFC_V2`` built in both optimizer branches, SGD with momentum 0.9, a polynomial
  schedule with warm-up stepped after every batch, the config dumped key by key, the loop
  ``for epoch in range(...)`` / ``for _, (img, local_labels) in enumerate(train_loader)`` with
  gradient accumulation, the backbone gradient norm clipped at 5, ``model.pt`` at the end;
- ``partial_fc_v2.py``: the class shard of this rank (Partial FC rule), labels and embeddings
  all-gathered, the gather's backward sums each rank's slice over ranks and multiplies it by the
  world size (upstream's ``grad_out *= len(grad_list)``: DDP averages afterwards), a distributed
  softmax cross-entropy whose gradient is that of the global-batch mean;
- ``losses.py``: the combined margin, ArcFace applied without gradient (straight-through);
- ``dataset.py``: ``MXFaceDataset`` over the .rec with the transform ``Compose([ToPILImage,
  RandomHorizontalFlip, ToTensor, Normalize(0.5, 0.5)])`` (classes of those names in
  tests/upstream_cpu_shim.py: no torchvision), a ``DistributedSampler`` seeded by the config,
  ``drop_last``.

What differs, for a CPU test: gloo, no ``.cuda()``; the process group is joined only when the
test harness has not joined one already (upstream always joins, a 1-process group when run
alone); records are decoded by our RecordIO reader; ``sample_rate`` 1 only;
``backbones.get_model`` also knows ``fork_plain``, a network without BatchNorm (the gradient
tests split one batch over ranks).  The log line of each batch (``step .. epoch .. loss .. lr ..
head ..``) stands for upstream's ``CallBackLogging``.
'''
from __future__ import annotations

import os
from dataclasses import dataclass

TRAIN_V2 = '''\
import argparse
import logging
import os
import tempfile

import torch
from torch import distributed
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

from backbones import get_model
from dataset import get_dataloader
from losses import CombinedMarginLoss
from lr_scheduler import PolynomialLRWarmup
from partial_fc_v2 import PartialFC_V2
from utils.utils_config import get_config

if not distributed.is_initialized():
    if "WORLD_SIZE" in os.environ:
        distributed.init_process_group("gloo")
    else:
        distributed.init_process_group(
            "gloo", init_method="file://" + tempfile.mktemp(prefix="standin_pg_"),
            rank=0, world_size=1)
rank = distributed.get_rank()
world_size = distributed.get_world_size()


def setup_seed(seed):
    torch.manual_seed(seed)


def main(args):
    cfg = get_config(args.config)
    setup_seed(seed=cfg.seed)
    os.makedirs(cfg.output, exist_ok=True)
    if rank == 0:
        logging.basicConfig(level=logging.INFO, format="Training: %(asctime)s-%(message)s")

    train_loader = get_dataloader(
        cfg.rec, rank, cfg.batch_size, cfg.dali, cfg.dali_aug, cfg.seed, cfg.num_workers)

    backbone = get_model(
        cfg.network, dropout=0.0, fp16=cfg.fp16, num_features=cfg.embedding_size)

    backbone = torch.nn.parallel.DistributedDataParallel(
        module=backbone, broadcast_buffers=False, find_unused_parameters=True)
    backbone.register_comm_hook(None, fp16_compress_hook)

    backbone.train()
    backbone._set_static_graph()

    margin_loss = CombinedMarginLoss(
        64,
        cfg.margin_list[0],
        cfg.margin_list[1],
        cfg.margin_list[2],
        cfg.interclass_filtering_threshold
    )
    if cfg.optimizer == "sgd":
        module_partial_fc = PartialFC_V2(
            margin_loss, cfg.embedding_size, cfg.num_classes,
            cfg.sample_rate, False)
        module_partial_fc.train()
        opt = torch.optim.SGD(
            params=[{"params": backbone.parameters()}, {"params": module_partial_fc.parameters()}],
            lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        module_partial_fc = PartialFC_V2(
            margin_loss, cfg.embedding_size, cfg.num_classes,
            cfg.sample_rate, False)
        module_partial_fc.train()
        opt = torch.optim.AdamW(
            params=[{"params": backbone.parameters()}, {"params": module_partial_fc.parameters()}],
            lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise

    cfg.total_batch_size = cfg.batch_size * world_size
    cfg.warmup_step = cfg.num_image // cfg.total_batch_size * cfg.warmup_epoch
    cfg.total_step = cfg.num_image // cfg.total_batch_size * cfg.num_epoch
    lr_scheduler = PolynomialLRWarmup(
        optimizer=opt, warmup_iters=cfg.warmup_step, total_iters=cfg.total_step)

    start_epoch = 0
    global_step = 0
    for key, value in cfg.items():
        num_space = 25 - len(key)
        logging.info(": " + key + " " * num_space + str(value))

    amp = torch.amp.GradScaler("cuda", growth_interval=100, enabled=cfg.fp16)

    for epoch in range(start_epoch, cfg.num_epoch):
        train_loader.sampler.set_epoch(epoch)
        for _, (img, local_labels) in enumerate(train_loader):
            global_step += 1
            local_embeddings = backbone(img)
            loss: torch.Tensor = module_partial_fc(local_embeddings, local_labels)

            if cfg.fp16:
                amp.scale(loss).backward()
                if global_step % cfg.gradient_acc == 0:
                    amp.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5)
                    amp.step(opt)
                    amp.update()
                    opt.zero_grad()
            else:
                loss.backward()
                if global_step % cfg.gradient_acc == 0:
                    torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5)
                    opt.step()
                    opt.zero_grad()
            lr_scheduler.step()
            if rank == 0:
                logging.warning("step %d epoch %d loss %.6f lr %.10g head %s", global_step, epoch,
                                loss.item(), lr_scheduler.get_last_lr()[0],
                                type(module_partial_fc).__name__)

    if rank == 0:
        torch.save(backbone.module.state_dict(), os.path.join(cfg.output, "model.pt"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Distributed Arcface Training in Pytorch")
    parser.add_argument("config", type=str, help="py config file")
    main(parser.parse_args())
'''

PARTIAL_FC_V2 = '''\
"""Stand-in of partial_fc_v2.py: class shards, all-gather with the x world-size backward."""
import torch
from torch import distributed
from torch.nn.functional import linear, normalize


class PartialFC_V2(torch.nn.Module):
    def __init__(self, margin_loss, embedding_size, num_classes, sample_rate=1.0, fp16=False):
        super().__init__()
        assert sample_rate == 1.0, "the stand-in scores every class"
        self.rank = distributed.get_rank()
        self.world_size = distributed.get_world_size()
        self.num_local = num_classes // self.world_size + int(
            self.rank < num_classes % self.world_size)
        self.class_start = num_classes // self.world_size * self.rank + min(
            self.rank, num_classes % self.world_size)
        self.margin_softmax = margin_loss
        self.weight = torch.nn.Parameter(torch.normal(0, 0.01, (self.num_local, embedding_size)))

    def forward(self, local_embeddings, local_labels):
        local_labels = local_labels.view(-1).long()
        parts = [torch.zeros_like(local_labels) for _ in range(self.world_size)]
        distributed.all_gather(parts, local_labels)
        labels = torch.cat(parts)
        embeddings = AllGatherFunc.apply(local_embeddings)
        owned = (labels >= self.class_start) & (labels < self.class_start + self.num_local)
        labels = torch.where(owned, labels - self.class_start, torch.full_like(labels, -1))
        logits = linear(normalize(embeddings), normalize(self.weight)).clamp(-1, 1)
        return DistCrossEntropyFunc.apply(self.margin_softmax(logits, labels), labels)


class DistCrossEntropyFunc(torch.autograd.Function):
    """Mean over the global batch of -log softmax at the target; softmax max and sum all-reduced."""

    @staticmethod
    def forward(ctx, logits, labels):
        top = logits.max(dim=1, keepdim=True)[0]
        distributed.all_reduce(top, distributed.ReduceOp.MAX)
        exp = torch.exp(logits - top)
        total = exp.sum(dim=1, keepdim=True)
        distributed.all_reduce(total, distributed.ReduceOp.SUM)
        prob = exp / total
        rows = torch.where(labels != -1)[0]
        picked = torch.zeros(logits.size(0), 1, dtype=logits.dtype)
        picked[rows, 0] = prob[rows, labels[rows]]
        distributed.all_reduce(picked, distributed.ReduceOp.SUM)
        ctx.save_for_backward(prob, rows, labels)
        return -picked.clamp_min(1e-30).log().mean()

    @staticmethod
    def backward(ctx, grad):
        prob, rows, labels = ctx.saved_tensors
        out = prob.clone()
        out[rows, labels[rows]] -= 1
        return out * grad / prob.size(0), None


class AllGatherFunc(torch.autograd.Function):
    """[B, D] -> [W*B, D]; backward: this rank's slice summed over ranks, times the world size
    (as upstream, so that DDP's average over ranks gives the global-batch mean's gradient)."""

    @staticmethod
    def forward(ctx, tensor):
        parts = [torch.empty_like(tensor) for _ in range(distributed.get_world_size())]
        distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        distributed.all_reduce(grad, distributed.ReduceOp.SUM)
        world = distributed.get_world_size()
        out = grad.chunk(world)[distributed.get_rank()].clone()
        out *= world
        return out
'''

LOSSES = '''\
"""Stand-in of losses.py: s * cos(m1 * theta + m2) - m3 at the target, ArcFace without gradient."""
import torch


class CombinedMarginLoss(torch.nn.Module):
    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        super().__init__()
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3

    def forward(self, logits, labels):
        rows = torch.where(labels != -1)[0]
        target = logits[rows, labels[rows]]
        if self.m3 > 0 and self.m2 == 0:        # CosFace
            final = target - self.m3
        else:                                   # ArcFace (combined): value only, no gradient
            with torch.no_grad():
                value = torch.cos(self.m1 * torch.acos(target) + self.m2) - self.m3
            final = target + (value - target.detach())
        return logits.index_put((rows, labels[rows]), final) * self.s
'''

LR_SCHEDULER = '''\
"""Stand-in of lr_scheduler.py: linear warm-up, then polynomial (power 2) decay, per batch;
PolyScheduler (2022-01 .. 2023-02) and PolynomialLRWarmup (2023-04 ..) take other arguments."""
import torch


def _factor(warmup_iters, total_iters, power):
    def factor(step):
        if step < warmup_iters:
            return (step + 1) / warmup_iters
        rest = max(total_iters - warmup_iters, 1)
        return max(1 - (step - warmup_iters) / rest, 0.0) ** power
    return factor


class PolynomialLRWarmup(torch.optim.lr_scheduler.LambdaLR):
    def __init__(self, optimizer, warmup_iters, total_iters=5, power=2.0, last_epoch=-1):
        super().__init__(optimizer, _factor(warmup_iters, total_iters, power),
                         last_epoch=last_epoch)


class PolyScheduler(torch.optim.lr_scheduler.LambdaLR):
    def __init__(self, optimizer, base_lr, max_steps, warmup_steps, last_epoch=-1):
        super().__init__(optimizer, _factor(warmup_steps, max_steps, 2.0), last_epoch=last_epoch)
'''

DATASET = '''\
"""Stand-in of dataset.py: MXFaceDataset (img, label) over a .rec with upstream's transform
(random horizontal flip), a seeded DistributedSampler, drop_last."""
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from data.dataset import FaceRecordDataset
from tests.upstream_cpu_shim import Compose, Normalize, RandomHorizontalFlip, ToPILImage, ToTensor


class MXFaceDataset(Dataset):
    def __init__(self, root_dir, local_rank=0):
        self.transform = Compose([ToPILImage(), RandomHorizontalFlip(), ToTensor(),
                                  Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])])
        self.records = FaceRecordDataset(root_dir, flip=False)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        sample = self.transform(self.records.decode(index))
        return sample, torch.tensor(self.records.labels[index], dtype=torch.long)


def get_dataloader(root_dir, local_rank, batch_size, dali=False, dali_aug=False, seed=2048,
                   num_workers=0):   # upstream: 2 (the tests' processes start workers by forkserver)
    dataset = MXFaceDataset(root_dir, local_rank)
    sampler = DistributedSampler(dataset, shuffle=True, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                      num_workers=num_workers, drop_last=True)
'''

BACKBONES = '''\
"""Stand-in of backbones/__init__.py: upstream's names, plus a custom network of the fork; a
bare ValueError for any other name, as upstream."""
import torch
from torch import nn


class ForkPlainNet(nn.Module):
    """A fork's own small network WITHOUT BatchNorm: [B, 3, 112, 112] -> [B, num_features].
    (BatchNorm in train mode normalises with each rank's own batch, so a network with it gives
    other forward values when the same global batch is split over more ranks.)"""

    def __init__(self, num_features=512):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 4, 1), nn.PReLU(8),
                                  nn.Conv2d(8, 16, 3, 4, 1), nn.PReLU(16))
        self.fc = nn.Linear(16 * 7 * 7, num_features)

    def forward(self, x):
        return self.fc(torch.flatten(self.body(x), 1))


def get_model(name, **kwargs):
    if name in ("r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large"):
        from plugins.backbones import get_model as same_architecture
        return same_architecture(name, **kwargs)
    if name == "fork_plain":
        return ForkPlainNet(num_features=kwargs.get("num_features", 512))
    raise ValueError()
'''

UTILS_CONFIG = '''\
"""Stand-in of utils/utils_config.py: configs.base, then configs.<job>, merged in place."""
import importlib
import os.path as osp


def get_config(config_file):
    assert config_file.startswith("configs/"), "config file setting must start with configs/"
    temp_module_name = osp.splitext(osp.basename(config_file))[0]
    config = importlib.import_module("configs.base").config
    job_cfg = importlib.import_module("configs.%s" % temp_module_name).config
    config.update(job_cfg)
    if config.output is None:
        config.output = osp.join("work_dirs", temp_module_name)
    return config
'''

BASE = '''\
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r50"
config.resume = False
config.save_all_states = False
config.output = None
config.embedding_size = 512
config.sample_rate = 1.0
config.interclass_filtering_threshold = 0
config.fp16 = False
config.batch_size = 128
config.optimizer = "sgd"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.verbose = 2000
config.frequent = 10
config.dali = False
config.dali_aug = False
config.gradient_acc = 1
config.seed = 2048
config.num_workers = 0
config.wandb_key = "XXXX"
config.suffix_run_name = None
config.using_wandb = False
config.wandb_entity = "entity"
config.wandb_project = "project"
config.wandb_log_all = True
config.save_artifacts = False
config.wandb_resume = False
'''

FILES = {
    "train_v2.py": TRAIN_V2,
    "partial_fc_v2.py": PARTIAL_FC_V2,
    "losses.py": LOSSES,
    "lr_scheduler.py": LR_SCHEDULER,
    "dataset.py": DATASET,
    "backbones/__init__.py": BACKBONES,
    "utils/__init__.py": "",
    "utils/utils_config.py": UTILS_CONFIG,
    "configs/__init__.py": "",
    "configs/base.py": BASE,
}


def write_files(root: str, files: dict) -> str:
    """Write ``files`` ({relative path: text}) to ``root/arcface_torch``; return that folder."""
    fork = os.path.join(root, "arcface_torch")
    for rel, text in files.items():
        path = os.path.join(fork, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    return fork


def write_upstream_standin(root: str) -> str:
    """Write the stand-in fork to ``root/arcface_torch`` (unpatched); return that folder."""
    return write_files(root, FILES)


# ------------------------------------------------------------ every shape of upstream's history

def _edit(text: str, *changes) -> str:
    """``text`` with each ``(old, new)`` replaced; every ``old`` must be there."""
    for old, new in changes:
        assert old in text, old
        text = text.replace(old, new)
    return text


def _base_without(*keys: str) -> str:
    return "".join(line + "\n" for line in BASE.splitlines()
                   if not any(line.startswith(f"config.{key} =") for key in keys))


_WANDB_KEYS = ("wandb_key", "suffix_run_name", "using_wandb", "wandb_entity", "wandb_project",
               "wandb_log_all", "save_artifacts", "wandb_resume")

# train_v2.py of 2022-07-13 (c4169543): PolyScheduler(optimizer=, base_lr=, max_steps=,
# warmup_steps=, last_epoch=), --local_rank, no comm hook, set_epoch under isinstance(DataLoader)
TRAIN_V2_2022_07 = _edit(
    TRAIN_V2,
    ("from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook\n",
     "from torch.utils.data import DataLoader\n"),
    ("from lr_scheduler import PolynomialLRWarmup", "from lr_scheduler import PolyScheduler"),
    ("    backbone.register_comm_hook(None, fp16_compress_hook)\n", ""),
    ("        cfg.rec, rank, cfg.batch_size, cfg.dali, cfg.dali_aug, cfg.seed, cfg.num_workers)",
     "        cfg.rec, args.local_rank, cfg.batch_size, cfg.dali, seed=cfg.seed,\n"
     "        num_workers=cfg.num_workers)"),
    ("    lr_scheduler = PolynomialLRWarmup(\n"
     "        optimizer=opt, warmup_iters=cfg.warmup_step, total_iters=cfg.total_step)",
     "    lr_scheduler = PolyScheduler(\n"
     "        optimizer=opt,\n        base_lr=cfg.lr,\n        max_steps=cfg.total_step,\n"
     "        warmup_steps=cfg.warmup_step,\n        last_epoch=-1\n    )"),
    ("        train_loader.sampler.set_epoch(epoch)\n",
     "        if isinstance(train_loader, DataLoader):\n"
     "            train_loader.sampler.set_epoch(epoch)\n"),
    ("            cfg.sample_rate, False)", "            cfg.sample_rate, cfg.fp16)"),
    ('    parser.add_argument("config", type=str, help="py config file")\n',
     '    parser.add_argument("config", type=str, help="py config file")\n'
     '    parser.add_argument("--local_rank", type=int, default=0, help="local_rank")\n'))

_WANDB_BLOCK = (
    "    wandb_logger = None\n"
    "    if {flag}:\n"
    "        import wandb\n"
    "        wandb_logger = wandb.init(project=cfg.wandb_project)\n")
# 2023-01-01 .. 2023-01-05 (115c6c1c, 97bfb089, 8473d52c): wandb, `if using_wandb:` -- a name
# defined nowhere: upstream's own NameError, patched or not
TRAIN_V2_2023_01 = _edit(
    TRAIN_V2_2022_07,
    ("    os.makedirs(cfg.output, exist_ok=True)\n",
     "    os.makedirs(cfg.output, exist_ok=True)\n" + _WANDB_BLOCK.format(flag="using_wandb")))
# 2023-02-08 (643d717d, 5d53e801): LOCAL_RANK from the environment, `if cfg.using_wandb:`
TRAIN_V2_2023_02 = _edit(
    TRAIN_V2_2023_01,
    ("    if using_wandb:\n", "    if cfg.using_wandb:\n"),
    ("        cfg.rec, args.local_rank,", "        cfg.rec, int(os.environ.get(\"LOCAL_RANK\", 0)),"),
    ('    parser.add_argument("--local_rank", type=int, default=0, help="local_rank")\n', ""))

# train.py of 2022-01 .. 2022-05: PartialFC(...) from partial_fc.py, called with the optimizer
# (it updates its sampled class shard's momentum itself); no gradient accumulation; a base
# without gradient_acc (2022-07), dali_aug and wandb (2023), seed and num_workers (2022-05-22)
TRAIN_2022_01 = _edit(
    TRAIN_V2_2022_07,
    ("from partial_fc_v2 import PartialFC_V2", "from partial_fc import PartialFC, PartialFCAdamW"),
    ("    setup_seed(seed=cfg.seed)\n", ""),
    ("        cfg.rec, args.local_rank, cfg.batch_size, cfg.dali, seed=cfg.seed,\n"
     "        num_workers=cfg.num_workers)",
     "        cfg.rec, local_rank=args.local_rank, batch_size=cfg.batch_size, dali=cfg.dali)"),
    ("module_partial_fc(local_embeddings, local_labels)",
     "module_partial_fc(local_embeddings, local_labels, opt)"),
    ("                if global_step % cfg.gradient_acc == 0:\n"
     "                    amp.unscale_(opt)\n"
     "                    torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5)\n"
     "                    amp.step(opt)\n"
     "                    amp.update()\n"
     "                    opt.zero_grad()\n",
     "                amp.unscale_(opt)\n"
     "                torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5)\n"
     "                amp.step(opt)\n"
     "                amp.update()\n"),
    ("                if global_step % cfg.gradient_acc == 0:\n"
     "                    torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5)\n"
     "                    opt.step()\n"
     "                    opt.zero_grad()\n",
     "                torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5)\n"
     "                opt.step()\n"
     "            opt.zero_grad()\n"))
TRAIN_2022_01 = TRAIN_2022_01.replace("        module_partial_fc = PartialFC_V2(",
                                      "        module_partial_fc = PartialFC(", 1)
TRAIN_2022_01 = TRAIN_2022_01.replace("        module_partial_fc = PartialFC_V2(",
                                      "        module_partial_fc = PartialFCAdamW(", 1)

PARTIAL_FC_2022 = '''\
"""Stand-in of partial_fc.py (2022-01 .. 2022-05): PartialFC_V2's math, called with the optimizer."""
from partial_fc_v2 import PartialFC_V2


class PartialFC(PartialFC_V2):
    def forward(self, local_embeddings, local_labels, optimizer):
        return super().forward(local_embeddings, local_labels)


PartialFCAdamW = PartialFC
'''

# train.py of 2021-07 .. 2021-09 (402f814f .. 55eca2d0): configs/ + get_config, PartialFC v1:
# the head's gradient handed to features.backward, a second optimizer for the class shard,
# lr = cfg.lr / 512 x global batch.  Never run here: its route is train_distill.py.
TRAIN_2021_07 = '''\
import argparse

import torch
import torch.nn.functional as F
from torch.nn.utils import clip_grad_norm_

import losses
from backbones import get_model
from dataset import MXFaceDataset, DataLoaderX
from partial_fc import PartialFC
from utils.utils_config import get_config


def main(args):
    cfg = get_config(args.config)
    world_size, rank, local_rank = 1, 0, args.local_rank
    train_set = MXFaceDataset(root_dir=cfg.rec, local_rank=local_rank)
    train_sampler = torch.utils.data.distributed.DistributedSampler(train_set, shuffle=True)
    train_loader = DataLoaderX(local_rank=local_rank, dataset=train_set,
                               batch_size=cfg.batch_size, sampler=train_sampler, drop_last=True)
    backbone = get_model(cfg.network, dropout=0.0, fp16=cfg.fp16,
                         num_features=cfg.embedding_size)
    margin_softmax = losses.get_loss(cfg.loss)
    module_partial_fc = PartialFC(rank=rank, local_rank=local_rank, world_size=world_size,
                                  resume=cfg.resume, batch_size=cfg.batch_size,
                                  margin_softmax=margin_softmax, num_classes=cfg.num_classes,
                                  sample_rate=cfg.sample_rate,
                                  embedding_size=cfg.embedding_size, prefix=cfg.output)
    opt_backbone = torch.optim.SGD(params=[{"params": backbone.parameters()}],
                                   lr=cfg.lr / 512 * cfg.batch_size * world_size,
                                   momentum=0.9, weight_decay=cfg.weight_decay)
    opt_pfc = torch.optim.SGD(params=[{"params": module_partial_fc.parameters()}],
                              lr=cfg.lr / 512 * cfg.batch_size * world_size,
                              momentum=0.9, weight_decay=cfg.weight_decay)
    for epoch in range(0, cfg.num_epoch):
        train_sampler.set_epoch(epoch)
        for step, (img, label) in enumerate(train_loader):
            features = F.normalize(backbone(img))
            x_grad, loss_v = module_partial_fc.forward_backward(label, features, opt_pfc)
            features.backward(x_grad)
            clip_grad_norm_(backbone.parameters(), max_norm=5, norm_type=2)
            opt_backbone.step()
            opt_pfc.step()
            module_partial_fc.update()
            opt_backbone.zero_grad()
            opt_pfc.zero_grad()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="PyTorch ArcFace Training")
    parser.add_argument("config", type=str, help="py config file")
    parser.add_argument("--local_rank", type=int, default=0, help="local_rank")
    main(parser.parse_args())
'''

# configs/base.py of 2021-07 .. 2021-09: `loss` instead of margin_list, the dataset chosen in the
# base itself, a fixed output folder; none of margin_list, optimizer, seed, num_workers, ...
BASE_2021_07 = '''\
from easydict import EasyDict as edict

config = edict()
config.loss = "arcface"
config.network = "r50"
config.resume = False
config.output = "ms1mv3_arcface_r50"

config.dataset = "ms1m-retinaface-t1"
config.embedding_size = 512
config.sample_rate = 1
config.fp16 = False
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128
config.lr = 0.1  # batch size is 512

if config.dataset == "ms1m-retinaface-t1":
    config.rec = "/train_tmp/ms1m-retinaface-t1"
    config.num_classes = 93431
    config.num_image = 5179510
    config.num_epoch = 25
    config.warmup_epoch = -1
    config.decay_epoch = [11, 17, 22]
    config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
'''

# train.py of 2021-03 .. 2021-06: `from config import config as cfg` (config.py at the root, no
# configs/), network and loss from the command line, otherwise the loop of 2021-07
TRAIN_2021_03 = _edit(
    TRAIN_2021_07,
    ("from utils.utils_config import get_config\n", "from config import config as cfg\n"),
    ("    cfg = get_config(args.config)\n", ""),
    ("get_model(cfg.network,", "get_model(args.network,"),
    ("losses.get_loss(cfg.loss)", "losses.get_loss(args.loss)"),
    ('    parser.add_argument("config", type=str, help="py config file")\n',
     '    parser.add_argument("--network", type=str, default="r50", help="backbone network")\n'
     '    parser.add_argument("--loss", type=str, default="arcface", help="loss function")\n'))

# config.py of 2021-03 .. 2021-06: the same keys without loss / network / resume (command-line
# arguments then), the per-epoch lr function in the config
CONFIG_2021_03 = _edit(
    BASE_2021_07,
    ('config.loss = "arcface"\nconfig.network = "r50"\nconfig.resume = False\n', ""),
    ("    config.decay_epoch = [11, 17, 22]\n",
     "\n    def lr_step_func(epoch):\n"
     "        return 0.1 ** len([m for m in [11, 17, 22] if m - 1 <= epoch])\n"
     "    config.lr_func = lr_step_func\n"))

# backbones/__init__.py of 2021-03: one function per network, no get_model yet (2021-06)
BACKBONES_2021_03 = '''\
"""Stand-in of backbones/__init__.py of 2021-03: one function per network, no get_model."""


def iresnet50(pretrained=False, **kwargs):
    from plugins.backbones import get_model
    return get_model("r50", **kwargs)
'''

_OLD_MODULES = {"dataset.py": "# stand-in: mxnet's MXFaceDataset and DataLoaderX (not run)\n",
                "partial_fc.py": "# stand-in: PartialFC v1 with forward_backward (not run)\n",
                "losses.py": "# stand-in: get_loss (not run)\n"}


@dataclass(frozen=True)
class VintageStandIn:
    """One shape of upstream's history: ``files`` to write (None: not there), its training
    ``script``, whether patches/patch_train_v2.py fits it (``patchable``), and
    ``runs_unpatched`` (False: upstream's own bug stops the script, patched or not)."""
    period: str
    script: str
    files: dict
    patchable: bool
    runs_unpatched: bool = True


VINTAGES = {
    "2021-03": VintageStandIn("2021-03 .. 2021-06", "train.py", {
        "train.py": TRAIN_2021_03, "config.py": CONFIG_2021_03,
        "backbones/__init__.py": BACKBONES_2021_03, "utils/__init__.py": "", **_OLD_MODULES},
        patchable=False),
    "2021-07": VintageStandIn("2021-07 .. 2021-09", "train.py", {
        **FILES, "train.py": TRAIN_2021_07, "configs/base.py": BASE_2021_07, **_OLD_MODULES,
        "train_v2.py": None, "partial_fc_v2.py": None, "lr_scheduler.py": None},
        patchable=False),
    "2022-01": VintageStandIn("2022-01 .. 2022-05", "train.py", {
        **FILES, "train.py": TRAIN_2022_01, "partial_fc.py": PARTIAL_FC_2022, "train_v2.py": None,
        "configs/base.py": _base_without("gradient_acc", "seed", "num_workers", "dali_aug",
                                         *_WANDB_KEYS)},
        patchable=True),
    "2022-07": VintageStandIn("2022-07 .. 2022-12", "train_v2.py", {
        **FILES, "train_v2.py": TRAIN_V2_2022_07,
        "configs/base.py": _base_without("dali_aug", *_WANDB_KEYS)}, patchable=True),
    "2023-01": VintageStandIn("2023-01-01 .. 2023-01-05", "train_v2.py", {
        **FILES, "train_v2.py": TRAIN_V2_2023_01}, patchable=True, runs_unpatched=False),
    "2023-02": VintageStandIn("2023-02-08", "train_v2.py", {
        **FILES, "train_v2.py": TRAIN_V2_2023_02}, patchable=True),
    "2023-04": VintageStandIn("2023-04 .. today", "train_v2.py", FILES, patchable=True),
}


def write_vintage(root: str, name: str) -> str:
    """Write the stand-in of ``VINTAGES[name]`` to ``root/arcface_torch``; return that folder."""
    return write_files(root, {rel: text for rel, text in VINTAGES[name].files.items()
                              if text is not None})
