"""patches/patch_train_v2.py: patching a fork's own train_v2.py by meaning, not line numbers.

The train_v2.py below is a stand-in written for this test with the structure of arcface_torch's
script (argparse, get_config, setup_seed, process group only under torchrun, get_model backbone,
CombinedMarginLoss, PartialFC_V2 built in two optimizer branches, PolyScheduler, the loader loop
``for _, (img, local_labels) in enumerate(train_loader)``); it uses ``.to(device)`` where the real
one calls ``.cuda()`` so it runs on a CPU.  Its helper modules are minimal single-process
stand-ins of the fork's own.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from patches import patch_train_v2 as patcher
from tests.test_install_into_fork import (PYTHON, REPO, fork_env, run_install, tiny_training_setup,
                                          write_fork)

TRAIN_V2 = '''\
import argparse
import logging
import os

import torch
from torch import distributed

from backbones import get_model
from dataset import get_dataloader
from losses import CombinedMarginLoss
from lr_scheduler import PolyScheduler
from partial_fc_v2 import PartialFC_V2
from utils.utils_config import get_config
from utils.utils_distributed_sampler import setup_seed

# join the process group only when launched by torchrun
if "WORLD_SIZE" in os.environ:
    distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
else:
    rank, world_size = 0, 1


def main(args):
    # experiment settings
    cfg = get_config(args.config)
    setup_seed(seed=cfg.seed, cuda_deterministic=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(args.local_rank)
        device = torch.device("cuda", args.local_rank)
    else:
        device = torch.device("cpu")
    os.makedirs(cfg.output, exist_ok=True)

    train_loader = get_dataloader(
        cfg.rec, args.local_rank, cfg.batch_size, cfg.seed, cfg.num_workers)

    backbone = get_model(
        cfg.network, dropout=0.0, fp16=cfg.fp16, num_features=cfg.embedding_size).to(device)
    if world_size > 1:
        backbone = torch.nn.parallel.DistributedDataParallel(
            module=backbone, broadcast_buffers=False, find_unused_parameters=True)
    backbone.train()

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
            cfg.sample_rate, cfg.fp16)
        module_partial_fc.train().to(device)
        opt = torch.optim.SGD(
            params=[{"params": backbone.parameters()}, {"params": module_partial_fc.parameters()}],
            lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        module_partial_fc = PartialFC_V2(
            margin_loss, cfg.embedding_size, cfg.num_classes,
            cfg.sample_rate, cfg.fp16)
        module_partial_fc.train().to(device)
        opt = torch.optim.AdamW(
            params=[{"params": backbone.parameters()}, {"params": module_partial_fc.parameters()}],
            lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise ValueError("unknown optimizer " + cfg.optimizer)

    cfg.total_batch_size = cfg.batch_size * world_size
    cfg.warmup_step = cfg.num_image // cfg.total_batch_size * cfg.warmup_epoch
    cfg.total_step = cfg.num_image // cfg.total_batch_size * cfg.num_epoch
    lr_scheduler = PolyScheduler(
        optimizer=opt, base_lr=cfg.lr, max_steps=cfg.total_step,
        warmup_steps=cfg.warmup_step, last_epoch=-1)

    start_epoch = 0
    global_step = 0
    amp = torch.amp.GradScaler("cuda", growth_interval=100, enabled=cfg.fp16)

    for epoch in range(start_epoch, cfg.num_epoch):
        for _, (img, local_labels) in enumerate(train_loader):
            global_step += 1
            local_embeddings = backbone(img)
            loss: torch.Tensor = module_partial_fc(local_embeddings, local_labels)
            if cfg.fp16:
                amp.scale(loss).backward()
                amp.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5)
                amp.step(opt)
                amp.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5)
                opt.step()
            opt.zero_grad()
            lr_scheduler.step()
            if rank == 0:
                logging.warning("step %d epoch %d loss %.6f head %s", global_step, epoch,
                                loss.item(), type(module_partial_fc).__name__)

    if rank == 0:
        torch.save(backbone.state_dict(), os.path.join(cfg.output, "model.pt"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="margin softmax training with Partial FC")
    parser.add_argument("config", type=str, help="configs/<name>")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    main(parser.parse_args())
'''

FORK_MODULES = {
    "partial_fc_v2.py": '''\
"""Single-process stand-in of the fork's Partial FC: a full classifier, margin, cross-entropy."""
import torch
import torch.nn.functional as F


class PartialFC_V2(torch.nn.Module):
    def __init__(self, margin_loss, embedding_size, num_classes, sample_rate=1.0, fp16=False):
        super().__init__()
        self.margin_softmax = margin_loss
        self.weight = torch.nn.Parameter(torch.normal(0, 0.01, (num_classes, embedding_size)))

    def forward(self, local_embeddings, local_labels):
        cos = F.linear(F.normalize(local_embeddings), F.normalize(self.weight)).clamp(-1, 1)
        return F.cross_entropy(self.margin_softmax(cos, local_labels), local_labels)
''',
    "losses.py": '''\
"""Stand-in of the fork's combined margin: s * cos(m1 * theta + m2) - m3 at the target."""
import torch


class CombinedMarginLoss(torch.nn.Module):
    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        super().__init__()
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3

    def forward(self, cos, labels):
        target = cos.gather(1, labels[:, None])
        margin = torch.cos(self.m1 * torch.acos(target) + self.m2) - self.m3
        return self.s * cos.scatter(1, labels[:, None], margin)
''',
    "lr_scheduler.py": '''\
"""Stand-in of the fork's polynomial schedule with linear warm-up."""
import torch


class PolyScheduler(torch.optim.lr_scheduler.LambdaLR):
    def __init__(self, optimizer, base_lr, max_steps, warmup_steps, last_epoch=-1):
        def factor(step):
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            return max(1 - (step - warmup_steps) / max(max_steps - warmup_steps, 1), 0) ** 2
        super().__init__(optimizer, factor, last_epoch=last_epoch)
''',
    "dataset.py": '''\
"""Stand-in of the fork's loader: yields (img, labels) only, as arcface_torch's does."""
import sys

from torch.utils.data import DataLoader, Dataset

sys.path.append("@REPO@")  # the stand-in borrows kdface's reader (last: the fork's plugins/ win)
from data.dataset import FaceRecordDataset  # noqa: E402


class ImagesAndLabels(Dataset):
    def __init__(self, root):
        self.records = FaceRecordDataset(root, flip=False)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        img, label, _, _ = self.records[index]
        return img, label


def get_dataloader(root, local_rank, batch_size, seed, num_workers):
    return DataLoader(ImagesAndLabels(root), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, drop_last=True)
''',
    "utils/utils_distributed_sampler.py": '''\
"""Stand-in of the fork's seeding helper."""
import random

import numpy as np
import torch


def setup_seed(seed, cuda_deterministic=True):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
''',
}


def patched_path(tmp_path, text: str = TRAIN_V2) -> str:
    path = tmp_path / "train_v2.py"
    path.write_text(text)
    return str(path)


def block_of(text: str, needle: str) -> str:
    """The marked block of ``text`` that contains ``needle`` (markers included)."""
    for match in re.finditer(r"^[ \t]*# >>> kdface distill.*?# <<< kdface distill\n", text,
                             re.MULTILINE | re.DOTALL):
        if needle in match.group(0):
            return match.group(0)
    raise AssertionError(f"no block with {needle!r}")


# ------------------------------------------------------------------------- the text of the patch

def test_patch_places_every_change_by_meaning():
    out = patcher.patch_source(TRAIN_V2)
    assert out.count("# >>> kdface distill") == out.count("# <<< kdface distill") == 12
    assert block_of(out, "from plugins.fork_loop") == (
        "# >>> kdface distill\n"
        "from plugins.fork_data import keyed_loader\n"
        "from plugins.fork_loop import (build_fork_head, build_fork_teacher, distill_method,\n"
        "                               fork_head_loss, model_builder, prepare_fork_config)\n"
        "from plugins.fork_recipe import grad_clipper, recipe_scheduler\n"
        "# <<< kdface distill\n")
    # right after the last import, before the process-group block
    assert "import setup_seed\n# >>> kdface distill\nfrom plugins.fork_data" in out
    config = block_of(out, "prepare_fork_config(cfg)")
    assert out.index("    cfg = get_config(args.config)\n") + len(
        "    cfg = get_config(args.config)\n") == out.index(config)
    assert config.splitlines()[1:-1] == [
        "    prepare_fork_config(cfg)  # checks our jobs; the fork's own stay untouched"]
    # the student goes through the plugin's resolver (the fork's builder for the fork's jobs)
    assert block_of(out, "model_builder(cfg, get_model)") == (
        "    # >>> kdface distill: replaces the statement kept below as #| comments\n"
        "    #| backbone = get_model(\n"
        "    #|     cfg.network, dropout=0.0, fp16=cfg.fp16, num_features=cfg.embedding_size)"
        ".to(device)\n"
        "    backbone = model_builder(cfg, get_model)(\n"
        "        cfg.network, dropout=0.0, fp16=cfg.fp16, num_features=cfg.embedding_size)"
        ".to(device)\n"
        "    # <<< kdface distill\n")
    # both optimizer branches: the construction is kept verbatim for "none"
    assert out.count("module_partial_fc = build_fork_head(cfg) if distill_method(cfg) != "
                     "\"none\" else PartialFC_V2(\n            margin_loss, cfg.embedding_size, "
                     "cfg.num_classes,\n            cfg.sample_rate, cfg.fp16)\n") == 2
    assert out.count("        module_partial_fc.train().to(device)\n") == 2  # untouched
    # the loader the loop iterates is keyed; the loop unpacks the sample keys
    assert block_of(out, "keyed_loader(cfg,") == (
        "    # >>> kdface distill: replaces the statement kept below as #| comments\n"
        "    #| train_loader = get_dataloader(\n"
        "    #|     cfg.rec, args.local_rank, cfg.batch_size, cfg.seed, cfg.num_workers)\n"
        "    train_loader = keyed_loader(cfg, get_dataloader(\n"
        "        cfg.rec, args.local_rank, cfg.batch_size, cfg.seed, cfg.num_workers))\n"
        "    # <<< kdface distill\n")
    assert block_of(out, "*sample_keys") == (
        "        # >>> kdface distill: replaces the statement kept below as #| comments\n"
        "        #| for _, (img, local_labels) in enumerate(train_loader):\n"
        "        for _, (img, local_labels, *sample_keys) in enumerate(train_loader):\n"
        "        # <<< kdface distill\n")
    # the scheduler: the job's schedule, or the fork's construction kept verbatim
    assert block_of(out, "recipe_scheduler(cfg") == (
        "    # >>> kdface distill: replaces the statement kept below as #| comments\n"
        "    #| lr_scheduler = PolyScheduler(\n"
        "    #|     optimizer=opt, base_lr=cfg.lr, max_steps=cfg.total_step,\n"
        "    #|     warmup_steps=cfg.warmup_step, last_epoch=-1)\n"
        "    lr_scheduler = recipe_scheduler(cfg, opt, train_loader) or PolyScheduler(\n"
        "        optimizer=opt, base_lr=cfg.lr, max_steps=cfg.total_step,\n"
        "        warmup_steps=cfg.warmup_step, last_epoch=-1)\n"
        "    # <<< kdface distill\n")
    # both clip calls (fp16 and fp32 branches) through the job's grad_clip
    assert out.count("                grad_clipper(cfg, torch.nn.utils.clip_grad_norm_)("
                     "backbone.parameters(), 5)\n") == 2
    teacher = block_of(out, "build_fork_teacher(cfg")
    assert teacher == (
        "    # >>> kdface distill\n"
        "    teacher = build_fork_teacher(cfg, backbone, train_loader)\n"
        "    # <<< kdface distill\n")
    assert out.index(teacher) + len(teacher) == out.index(
        "    for epoch in range(start_epoch, cfg.num_epoch):")
    loss = block_of(out, "fork_head_loss(")
    assert loss == (
        "            # >>> kdface distill: replaces the statement kept below as #| comments\n"
        "            #| loss: torch.Tensor = module_partial_fc(local_embeddings, local_labels)\n"
        "            loss: torch.Tensor = fork_head_loss(\n"
        "                module_partial_fc, cfg, backbone, teacher, img, local_embeddings,\n"
        "                local_labels, epoch, sample_keys)\n"
        "            # <<< kdface distill\n")


def test_patch_follows_the_forks_names_and_chaining():
    renamed = (TRAIN_V2.replace("cfg", "conf").replace("module_partial_fc", "pfc")
               .replace("local_embeddings", "feats").replace("local_labels", "ids")
               .replace("(img, ", "(batch, ").replace("backbone(img)", "backbone(batch)")
               .replace("backbone", "net"))
    renamed = re.sub(r"\bepoch\b", "ep", renamed)
    # a fork that chains the device move onto the construction, on one line
    two_statements = ("        pfc = PartialFC_V2(\n"
                      "            margin_loss, conf.embedding_size, conf.num_classes,\n"
                      "            conf.sample_rate, conf.fp16)\n"
                      "        pfc.train().to(device)\n"
                      "        opt = torch.optim.SGD(")
    chained = ("        pfc = PartialFC_V2(margin_loss, conf.embedding_size, conf.num_classes)"
               ".train().cuda()\n"
               "        opt = torch.optim.SGD(")
    fork = renamed.replace(two_statements, chained)
    assert fork != renamed
    out = patcher.patch_source(fork)
    assert ('        pfc = (build_fork_head(conf) if distill_method(conf) != "none" else '
            'PartialFC_V2(margin_loss, conf.embedding_size, conf.num_classes)).train().cuda()\n'
            ) in out
    assert "    teacher = build_fork_teacher(conf, net, train_loader)\n" in out
    assert "    net = model_builder(conf, get_model)(\n" in out
    assert "fork_head_loss(\n                pfc, conf, net, teacher, batch, feats,\n" \
           "                ids, ep, sample_keys)\n" in out
    assert "        for _, (batch, ids, *sample_keys) in enumerate(train_loader):\n" in out
    assert "grad_clipper(conf, torch.nn.utils.clip_grad_norm_)(net.parameters(), 5)" in out
    assert "    prepare_fork_config(conf)  #" in out
    # a module-qualified builder keeps its qualification
    qualified = patcher.patch_source(fork.replace("    net = get_model(", "    net = backbones.get_model("))
    assert "    net = model_builder(conf, backbones.get_model)(\n" in qualified


def test_patch_is_idempotent_and_reverts_exactly():
    once = patcher.patch_source(TRAIN_V2)
    assert once != TRAIN_V2
    assert patcher.patch_source(once) == once
    assert patcher.revert_source(once) == TRAIN_V2
    # a code formatter turns "#|" into "# |" and re-wraps our lines: revert still restores
    formatted = once.replace("#| ", "# | ").replace(
        "fork_head_loss(\n                module_partial_fc,", "fork_head_loss(module_partial_fc,")
    assert formatted != once and patcher.revert_source(formatted) == TRAIN_V2
    crlf = TRAIN_V2.replace("\n", "\r\n")  # Windows line endings survive both ways
    patched = patcher.patch_source(crlf)
    assert "\n" not in patched.replace("\r\n", "")
    assert patcher.revert_source(patched) == crlf


def test_damaged_markers_are_refused():
    once = patcher.patch_source(TRAIN_V2)
    cut = once.replace("    # <<< kdface distill\n", "", 1)
    with pytest.raises(patcher.MarkerError, match="inside another block; restore the file"):
        patcher.patch_source(cut)
    with pytest.raises(patcher.MarkerError, match="never closed"):
        patcher.revert_source(once[:once.rindex("# <<< kdface distill")])
    with pytest.raises(patcher.MarkerError, match="without its"):
        patcher.revert_source("x = 1\n# <<< kdface distill\n")


@pytest.mark.parametrize("key, change, detail", [
    ("config", ("cfg = get_config(args.config)", "cfg = load_settings(args.config)"), ""),
    ("head", ("PartialFC_V2(\n", "FullFC(\n"), ""),
    ("loader", ("for _, (img, local_labels) in enumerate(train_loader):",
                "for _, (img, local_labels) in enumerate(get_dataloader(cfg.rec, 0, 8, 0, 0)):"),
     "the loop at line"),
    ("loader", ("for _, (img, local_labels) in enumerate(train_loader):",
                "for _, batch in enumerate(train_loader):\n"
                "            img, local_labels = batch"),
     "does not unpack img / local_labels as a tuple of names"),
    ("scheduler", ("    lr_scheduler = PolyScheduler(\n", "    lr_scheduler = make_schedule(\n"), ""),
    ("clip", ("torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5)", "pass"),
     "none in the loop at line"),
    ("loss", ("loss: torch.Tensor = module_partial_fc(local_embeddings, local_labels)",
              "loss = module_partial_fc(local_embeddings, local_labels, global_step)"),
     "calls it with other arguments than (embeddings, labels) or (embeddings, labels, "
     "<optimizer>)"),
    ("loss", ("local_embeddings = backbone(img)\n", "pass\n"),
     "no `local_embeddings = <backbone>(<img>)` before line"),
    ("loss", ("for epoch in range(start_epoch, cfg.num_epoch):",
              "for epoch in cfg.epochs:"), "no enclosing `for <epoch> in range(...)`"),
    ("backbone", ("get_model(\n", "build_network(\n"), ""),
    ("loss", ("loss: torch.Tensor = module_partial_fc(local_embeddings, local_labels)",
              "loss: torch.Tensor = compute(local_embeddings, local_labels)"),
     "no call of module_partial_fc"),
    ("loss", ("loss: torch.Tensor = module_partial_fc(local_embeddings, local_labels)",
              "loss: torch.Tensor = (\n                module_partial_fc(local_embeddings, "
              "local_labels))"), "the call must start on the assignment's line"),
    ("loss", ("        for _, (img, local_labels)",
              "        module_partial_fc = PartialFC_V2(margin_loss, 64, 4)\n"
              "        for _, (img, local_labels)"), "starts before line"),
])
def test_missing_anchor_is_refused_with_what_to_add_by_hand(tmp_path, capsys, key, change,
                                                            detail):
    assert change[0] in TRAIN_V2
    path = patched_path(tmp_path, TRAIN_V2.replace(change[0], change[1]))
    before = open(path).read()
    assert patcher.main([path]) == 1
    err = capsys.readouterr().err
    anchor = patcher.ANCHORS[key]
    assert f"cannot patch: anchor '{key}' not found -- {anchor.meaning}" in err
    assert f"searched for: {anchor.pattern}" in err
    assert f"add by hand {anchor.by_hand}" in err and "Nothing was written." in err
    assert detail in err
    assert open(path).read() == before and not os.path.exists(path + ".orig")
    assert sorted(os.listdir(tmp_path)) == ["train_v2.py"]  # no temporary left behind


def test_loss_outside_a_loop_and_no_imports_are_refused():
    script = ("from partial_fc_v2 import PartialFC_V2\n\n\n"
              "def main(args):\n"
              "    cfg = get_config(args.config)\n"
              "    net = get_model(cfg.network)\n"
              "    head = PartialFC_V2(None, 512, 10)\n"
              "    emb = net(images)\n"
              "    loss = head(emb, labels)\n")
    with pytest.raises(patcher.AnchorNotFound, match="anchor 'loss' not found .* "
                                                     r"\(line 9 is not in a loop\)"):
        patcher.patch_source(script)
    with pytest.raises(patcher.AnchorNotFound, match="anchor 'imports' not found -- the "
                                                     "module-level imports"):
        patcher.patch_source(script.replace("from partial_fc_v2 import PartialFC_V2\n", ""))


def test_names_the_patch_introduces_must_be_free():
    text = TRAIN_V2.replace("    start_epoch = 0\n", "    start_epoch = 0\n    teacher = None\n")
    with pytest.raises(ValueError, match=r"already assigns \['teacher'\], names the patch "
                                         r"introduces; rename them in the fork"):
        patcher.patch_source(text)


def test_ambiguous_loss_call_is_refused():
    text = TRAIN_V2.replace(
        "            if cfg.fp16:\n",
        "            extra = module_partial_fc(local_embeddings, local_labels)\n"
        "            if cfg.fp16:\n", 1)
    with pytest.raises(patcher.AnchorNotFound, match=r"ambiguous: 2 calls, lines \d+, \d+"):
        patcher.patch_source(text)


# ------------------------------------------------------------------------------ files and CLI

def test_cli_dry_run_patch_repatch_and_revert(tmp_path):
    path = patched_path(tmp_path)
    os.chmod(path, 0o754)  # an executable script: the backup and the patched file keep its mode
    script = os.path.join(REPO, "patches", "patch_train_v2.py")

    def cli(*flags):
        return subprocess.run([PYTHON, script, path, *flags], capture_output=True, text=True,
                              timeout=60)

    dry = cli("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert open(path).read() == TRAIN_V2 and sorted(os.listdir(tmp_path)) == ["train_v2.py"]
    assert dry.stdout.startswith(f"--- {path}\n+++ {path} (patched)\n")
    assert "+                module_partial_fc, cfg, backbone, teacher, img, local_embeddings," \
        in dry.stdout
    assert "-            loss: torch.Tensor = module_partial_fc(local_embeddings, local_labels)" \
        in dry.stdout
    assert "nothing written" in dry.stdout

    done = cli()
    assert done.returncode == 0 and "patched (previous content saved as" in done.stdout
    patched = open(path).read()
    assert patched == patcher.patch_source(TRAIN_V2)
    assert open(path + ".orig").read() == TRAIN_V2
    assert os.stat(path).st_mode & 0o777 == 0o754
    assert os.stat(path + ".orig").st_mode & 0o777 == 0o754

    again = cli()
    assert again.returncode == 0 and "already patched, nothing to do" in again.stdout
    assert open(path).read() == patched and open(path + ".orig").read() == TRAIN_V2

    back = cli("--revert")
    assert back.returncode == 0 and open(path).read() == TRAIN_V2
    assert back.stdout.strip() == f"{path}: reverted"
    # the revert leaves the backup of the original alone (it used to overwrite it with the
    # patched text), and the reverted file keeps its mode
    assert open(path + ".orig").read() == TRAIN_V2
    assert os.stat(path).st_mode & 0o777 == 0o754
    assert sorted(os.listdir(tmp_path)) == ["train_v2.py", "train_v2.py.orig"]
    missing = subprocess.run([PYTHON, script, str(tmp_path / "nope.py")], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_invalid_python_is_refused(tmp_path, capsys):
    path = patched_path(tmp_path, "def broken(:\n")
    assert patcher.main([path, "--dry-run"]) == 1
    assert "not valid Python (invalid syntax at line 1)" in capsys.readouterr().err


# ----------------------------------------------------------------- the patched script, running

TINY_JOB = '''\
from easydict import EasyDict as edict

config = edict()
config.distill = {distill!r}
config.network = "tiny_s"
config.teacher_network = "tiny_t"
config.teacher_checkpoint = {teacher!r}
config.teacher_cache = {cache!r}
config.embedding_size = 64
config.teacher_embedding_size = 64
config.margin_list = (1.0, 0.45, 0.0)
config.rec = {rec!r}
config.num_classes = 4
config.num_image = 16
config.num_epoch = 1
config.warmup_epoch = 0
config.batch_size = 8
config.num_workers = 0
config.output = {output!r}
'''


FORK_JOB = '''\
from easydict import EasyDict as edict

config = edict()
config.network = "forknet"
config.embedding_size = 64
config.margin_list = (1.0, 0.3, 0.2)  # a combined margin: fine for PartialFC_V2, not for our heads
config.interclass_filtering_threshold = 0.4
config.rec = {rec!r}
config.num_classes = 4
config.num_image = 16
config.num_epoch = 1
config.warmup_epoch = 0
config.batch_size = 8
config.num_workers = 0
config.output = {output!r}
'''


@pytest.fixture(scope="module")
def patched_fork(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("patched_fork"))
    fork = write_fork(root, delegate_unknown_networks=True)
    for rel, text in {"train_v2.py": TRAIN_V2, **FORK_MODULES}.items():
        with open(os.path.join(fork, rel), "w") as handle:
            handle.write(text.replace("@REPO@", REPO))
    # the patched train_v2.py needs the plugin alone: nothing of engine/, data/, eval/, tools/
    code, report = run_install(fork, "--plugins-only")
    assert code == 0, report
    for ours in ("engine", "data", "tools", "train_distill.py"):
        assert not os.path.exists(os.path.join(fork, ours)), ours
    assert os.path.isfile(os.path.join(fork, "plugins", "fork_loop.py"))
    assert patcher.main([os.path.join(fork, "train_v2.py")]) == 0
    setup = tiny_training_setup(root)
    with open(os.path.join(fork, "configs", "kd_adadistill.py"), "w") as handle:
        handle.write(TINY_JOB.format(distill="adadistill", cache=None,
                                     output=os.path.join(root, "kd_adadistill"), **setup))
    with open(os.path.join(fork, "configs", "fork_own_job.py"), "w") as handle:
        handle.write(FORK_JOB.format(rec=setup["rec"], output=os.path.join(root, "fork_own_job")))
    os.replace(os.path.join(fork, "train_v2.py.orig"), os.path.join(fork, "train_v2_original.py"))
    return fork, root


def first_step_loss(fork: str, job: str) -> float:
    """The first loss the patched script must log, recomputed here from the same seed, data,
    networks and head: ``head(tiny_s(img), labels, teacher=tiny_t(img))`` -- the images mirrored
    as train_distill.py's dataset mirrors them in epoch 0 (the keyed loader's flips)."""
    import torch
    from engine.config import get_config
    from data.dataset import FaceRecordDataset
    from plugins.builders import build_head, build_teacher_source
    from plugins.backbones import get_model
    cfg = get_config(f"configs/{job}", root=fork)
    torch.manual_seed(cfg.seed)  # the stand-in's setup_seed, then the same construction order
    student = get_model("tiny_s", dropout=0.0, fp16=False, num_features=64).train()
    head = build_head(cfg).train()
    teacher = build_teacher_source(cfg, device=torch.device("cpu"))
    records = FaceRecordDataset(cfg.rec, flip=True, seed=cfg.seed)
    records.set_epoch(0)
    assert any(records[i][3] for i in range(cfg.batch_size))      # some of them mirrored
    img = torch.stack([records[i][0] for i in range(cfg.batch_size)])
    labels = torch.stack([records[i][1] for i in range(cfg.batch_size)])
    with torch.no_grad():
        return float(head(student(img), labels,
                          teacher=teacher.teacher_embeddings(img, None, None), epoch=0))


RUN_SCRIPTS = '''\
"""Run `python <script> <config>` for each pair, in this one process (one torch import)."""
import runpy
import sys
import traceback

for script, config in zip(sys.argv[1::2], sys.argv[2::2]):
    print("=== run " + script + " " + config, file=sys.stderr, flush=True)
    for name in [m for m in sys.modules if m == "configs" or m.startswith("configs.")]:
        del sys.modules[name]  # the fork's get_config updates its base config in place
    sys.argv = [script, config]
    try:
        runpy.run_path(script, run_name="__main__")
    except Exception:
        traceback.print_exc()
'''


@pytest.fixture(scope="module")
def fork_runs(patched_fork):
    """The stderr of each run, all in one process: the fork's own job under the original and
    the patched script, then the distillation job."""
    fork, _ = patched_fork
    with open(os.path.join(fork, "run_scripts.py"), "w") as handle:
        handle.write(RUN_SCRIPTS)
    proc = subprocess.run([PYTHON, "run_scripts.py", "train_v2_original.py",
                           "configs/fork_own_job", "train_v2.py", "configs/fork_own_job",
                           "train_v2.py", "configs/kd_adadistill"],
                          cwd=fork, env=fork_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    runs = proc.stderr.split("=== run ")[1:]
    assert len(runs) == 3, proc.stderr
    return runs


def test_patched_train_v2_distills_on_cpu(patched_fork, fork_runs):
    fork, root = patched_fork
    run = fork_runs[2]                            # train_v2.py configs/kd_adadistill
    assert "Traceback" not in run, run
    steps = re.findall(r"step (\d+) epoch 0 loss (\S+) head (\w+)", run)
    assert [s[0] for s in steps] == ["1", "2"]  # 16 images / batch 8, one epoch
    assert {s[2] for s in steps} == {"AdaDistillHead"}
    losses = [float(s[1]) for s in steps]
    assert losses[0] == pytest.approx(first_step_loss(fork, "kd_adadistill"), rel=1e-4)
    assert all(0.0 < value < 2 * 64 + 2 for value in losses), losses  # CE of s = 64 logits
    import torch
    state = torch.load(os.path.join(root, "kd_adadistill", "model.pt"), weights_only=True)
    assert tuple(state["fc.weight"].shape) == (64, 96 * 7 * 7)  # tiny_s, from the fork's get_model


def test_patched_train_v2_keeps_the_forks_jobs(fork_runs):
    original, patched = (re.findall(r"step \d+ epoch 0 loss \S+ head \w+", run)
                         for run in fork_runs[:2])
    # the fork's own job (no distill key, a combined margin our heads refuse) trains as before
    assert len(original) == 2 and all(line.endswith("head PartialFC_V2") for line in original)
    assert "Traceback" not in fork_runs[1]
    assert patched == original  # same seed, same data: bit-identical losses
