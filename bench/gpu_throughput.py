"""Images/s of one training step on one device, side by side in one run: an upstream-style
arcface_torch step, our trainer's step, and our trainer fed from a .rec by its loader.

    python bench/gpu_throughput.py                        # one GPU (about 3 minutes on an H200)
    python bench/gpu_throughput.py --quick                # CPU: tiny networks, few steps (a test)
    python bench/gpu_throughput.py --arcface-torch PATH   # also upstream's own train_v2, synthetic
    python bench/gpu_throughput.py --out work_dirs/gpu_throughput/table    # + table.md/.json

Columns, images/s (samples of the batch per second), min and median over ``--rounds`` rounds
that interleave every setting and column (each round: ``--steps`` timed steps after the warm-up):

  (a) upstream  an arcface_torch ``train_v2`` step written here for one device: the same student
                backbone (its own fp16 autocast, no channels_last), a Partial FC margin head
                (sample_rate 1: normalised embeddings x normalised weight [C, D], the ArcFace
                margin applied without gradient, cross entropy), GradScaler scale / backward /
                unscale_ / clip 5 / step / update (GradScaler.step reads found-inf, as upstream's
                loop does), then ``loss.item()`` (upstream's AverageMeter).  Distillation rows add
                the official loops' teacher step before it: a no_grad eval forward of the teacher
                + F.normalize (online), or the cached embeddings' host-to-device copy (cached).
  (b) step      ``engine.trainer.train_step`` -- the trainer's own code, built by
                ``engine.trainer.prepare_run`` from a job config -- on the same in-memory batches
                (images and labels already on the device).
  (c) loader    the same ``train_step`` fed by the run's own loader from the synthetic .rec
                (decode, flip, collate, copy), steady state (a window starts after the loader's
                first batch).
  ratios        b/a (our step against upstream's), c/b (what the loader leaves of our step).

Rows: ``alone`` (distill = none: our standalone margin head), ``adadistill-online``,
``adadistill-cached``, ``gkd-online``, ``gkd-cached``; settings: precision ``fp16`` (float16
autocast + GradScaler) or ``fp32``, and config key ``compile`` (``off``, ``default``,
``reduce-overhead``...).  Default on a GPU: every row in fp16, the paper rows alone / AdaDistill
in fp32, compile ``default`` and ``reduce-overhead`` for alone and ``default`` for
AdaDistill-cached (``--rows/--precisions/--compile`` give a full product instead).  The plain
settings' rounds run first, the compiled ones' after (compilation takes minutes): the table,
rewritten after every round, keeps whatever a time limit lets finish.  GPU scale: mobilefacenet
student, r50 teacher (random weights, BatchNorm calibrated on the synthetic faces), 85,742
classes, batch 128; ``--quick``: tiny_s / tiny_t, 100 classes, batch 8, fp32 and CPU float16.

``--arcface-torch PATH`` (an insightface checkout or its recognition/arcface_torch folder): also
runs upstream's own ``train_v2.py`` with its synthetic data (``config.rec = "synthetic"``: one
random image, label 1, repeated) on a copy of that folder, network ``mbf`` (upstream's
MobileFaceNet, not our student), reading the ``Speed ... samples/sec`` lines of its log.  Upstream
needs nccl (a GPU) and, on current stacks, stand-ins that this script puts first on its
PYTHONPATH: its dataset module imports mxnet and torchvision although synthetic mode uses
neither, and its PolynomialLRWarmup passes ``verbose`` to a torch LR scheduler that no longer
takes it (torch >= 2.7).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROWS = {"alone": ("none", ""), "adadistill-online": ("adadistill", "online"),
        "adadistill-cached": ("adadistill", "cached"), "gkd-online": ("gkd", "online"),
        "gkd-cached": ("gkd", "cached")}
GPU_PLAN = ([(row, "fp16", "off") for row in ROWS]
            + [(row, "fp32", "off") for row in ("alone", "adadistill-online",
                                                "adadistill-cached")]
            + [("alone", "fp16", "default"), ("alone", "fp16", "reduce-overhead"),
               ("adadistill-cached", "fp16", "default")])


@dataclass(frozen=True)
class Setting:
    row: str
    precision: str      # fp16 | fp32
    compile: str        # off | a torch.compile mode

    @property
    def tag(self) -> str:
        return f"{self.row}_{self.precision}_{self.compile}".replace("-", "_")

    @property
    def teacher(self) -> str:
        return ROWS[self.row][1]


@dataclass
class Scale:
    student: str
    teacher: str
    dim: int
    num_classes: int
    num_ids: int          # identities of the synthetic .rec (labels < num_ids <= num_classes)
    batch: int
    margin_scale: float


GPU_SCALE = Scale("mobilefacenet", "r50", 512, 85742, 150, 128, 64.0)
QUICK_SCALE = Scale("tiny_s", "tiny_t", 64, 100, 16, 8, 16.0)
MARKER = ".gpu_throughput"          # a work folder this script made (safe to clear)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ work folder

def write_config(work: str, name: str, **values) -> object:
    """A job config file ``work/configs/<name>.py``, loaded with the real loader."""
    from engine.config import get_config
    lines = ["from easydict import EasyDict as edict", "config = edict()"]
    lines += [f"config.{key} = {value!r}" for key, value in values.items()]
    with open(os.path.join(work, "configs", f"{name}.py"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return get_config(f"configs/{name}", root=work)


def calibrated_teacher(scale: Scale, images: torch.Tensor, device: torch.device) -> Dict:
    """Random teacher weights with BatchNorm statistics of ``images`` (a raw random r50 outputs
    ~1e26, inf in float16); returns the state_dict."""
    from plugins.backbones import get_model
    torch.manual_seed(0)
    model = get_model(scale.teacher, num_features=scale.dim).to(device)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None          # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        for batch in images.to(device).split(max(1, len(images) // 4)):
            model(batch)
    return {k: v.cpu() for k, v in model.state_dict().items()}


def prepare_work(work: str, scale: Scale, device: torch.device, cached: bool,
                 num_workers: Optional[int], window: int) -> Dict:
    """Synthetic .rec (property: ``scale.num_classes`` classes) holding one loader window of
    ``window`` batches, teacher checkpoint and classifier, the teacher cache; returns the config
    values every setting shares."""
    from data.dataset import FaceRecordDataset
    from tools.synthetic import write_train_set
    if os.path.isdir(work):
        if not os.path.isfile(os.path.join(work, MARKER)):
            raise SystemExit(f"{work} exists and was not made by this script; pass another "
                             f"--workdir")
        shutil.rmtree(work)
    os.makedirs(os.path.join(work, "configs"))
    open(os.path.join(work, MARKER), "w").close()
    shutil.copy(os.path.join(REPO, "configs", "base.py"), os.path.join(work, "configs"))
    data = os.path.join(work, "data")
    per_id = -(-window * scale.batch // scale.num_ids)
    write_train_set(data, scale.num_ids, per_id, seed=0,
                    workers=max(1, min(8, (os.cpu_count() or 1) - 1)))
    with open(os.path.join(data, "property"), "w") as handle:    # labels < num_ids <= C
        handle.write(f"{scale.num_classes},112,112")
    dataset = FaceRecordDataset(data, num_classes=scale.num_classes, flip=False)
    images = torch.stack([dataset[i][0] for i in range(0, len(dataset), max(1, len(dataset)
                                                                              // 64))])
    torch.save(calibrated_teacher(scale, images, device), os.path.join(work, "teacher.pt"))
    classifier = F.normalize(torch.randn(scale.num_classes, scale.dim,
                                         generator=torch.Generator().manual_seed(1)), dim=1)
    torch.save(classifier, os.path.join(work, "classifier.pt"))
    common = dict(
        network=scale.student, teacher_network=scale.teacher, embedding_size=scale.dim,
        teacher_embedding_size=scale.dim, teacher_checkpoint=os.path.join(work, "teacher.pt"),
        teacher_classifier=os.path.join(work, "classifier.pt"), margin_list=(1.0, 0.0, 0.4),
        margin_scale=scale.margin_scale, rec=data, num_classes=scale.num_classes,
        num_image=len(dataset), num_epoch=10 ** 6, batch_size=scale.batch, lr=0.1,
        lr_schedule="step", lr_steps=(), val_targets=[], verbose=10 ** 9, frequent=10,
        save_every=10 ** 9, seed=0, gkd_k=min(10000, scale.num_classes // 4),
        gkd_warmup_epochs=0)
    if num_workers is not None:
        common["num_workers"] = num_workers
    if cached:
        from engine.teacher_cache_build import build_from_config
        common["teacher_cache"] = os.path.join(work, "teacher_cache")
        build_from_config(write_config(work, "cache_build", distill="adadistill", **common),
                          dtype="float16")
    return common


def precision_values(setting: Setting, device: torch.device) -> Dict:
    fp16 = setting.precision == "fp16"
    # float16 + GradScaler on every device (the CPU too: the GPU recipe's lines)
    return dict(fp16=fp16, teacher_fp16=fp16, amp_dtype="float16" if fp16 else "auto",
                channels_last=device.type == "cuda")


# ------------------------------------------------------------------ (a) upstream-style step

class UpstreamStep:
    """arcface_torch's train_v2 step on one device (see the module docstring, column a)."""

    def __init__(self, setting: Setting, scale: Scale, cfg, device: torch.device) -> None:
        from plugins.backbones import get_model
        from plugins.teacher import build_teacher
        self.device, self.fp16 = device, setting.precision == "fp16"
        torch.manual_seed(0)
        backbone = get_model(scale.student, num_features=scale.dim,
                             fp16=torch.float16 if self.fp16 else False).to(device)
        self.parameters = list(backbone.parameters())
        self.backbone = backbone if setting.compile == "off" else torch.compile(
            backbone, mode=_mode(setting.compile, device))
        self.weight = torch.nn.Parameter(torch.normal(0, 0.01, (scale.num_classes, scale.dim),
                                                      device=device))
        self.opt = torch.optim.SGD([{"params": self.parameters}, {"params": [self.weight]}],
                                   lr=0.1, momentum=0.9, weight_decay=5e-4)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.fp16, growth_interval=100)
        self.s, self.m = scale.margin_scale, 0.5
        self.teacher = self.table = None
        if setting.teacher == "online":
            self.teacher = build_teacher(scale.teacher, cfg.teacher_checkpoint, scale.dim,
                                         device=device).model.eval()
        elif setting.teacher == "cached":
            from plugins.teacher_cache import open_teacher_cache
            cache = open_teacher_cache(cfg)
            self.table = torch.from_numpy(cache.table[:].astype("float32"))   # [N, 2, D] host
            if device.type == "cuda":
                self.table = self.table.pin_memory()
        backbone.train()

    def teacher_step(self, images: torch.Tensor, index: torch.Tensor,
                     flipped: torch.Tensor) -> Optional[torch.Tensor]:
        if self.teacher is not None:          # the official loops: no_grad eval forward
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.float16,
                                                 enabled=self.fp16):
                return F.normalize(self.teacher(images).float())
        if self.table is not None:
            rows = self.table[index, flipped.long()]
            return rows.to(self.device, non_blocking=True)
        return None

    def __call__(self, batch) -> None:
        images, labels, index, flipped = batch
        self.teacher_step(images, index, flipped)
        embeddings = self.backbone(images)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.fp16):
            logits = F.linear(F.normalize(embeddings), F.normalize(self.weight))
        logits = logits.float().clamp(-1, 1)
        with torch.no_grad():                 # CombinedMarginLoss: ArcFace margin, no gradient
            rows = torch.arange(labels.shape[0], device=labels.device)
            target = logits[rows, labels]
            logits[rows, labels] = torch.cos(torch.acos(target) + self.m)
        loss = F.cross_entropy(logits * self.s, labels)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.parameters, 5)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad()
        loss.item()                           # upstream's AverageMeter, once per step


def _mode(compile_setting: str, device: torch.device) -> str:
    from engine.compiled import compile_mode
    return compile_mode(True if compile_setting == "default" else compile_setting, device.type)


# ------------------------------------------------------------------ (b), (c) our trainer

class OurRun:
    """One setting's trainer run (``prepare_run``) and its two timed steps."""

    def __init__(self, setting: Setting, cfg) -> None:
        from engine.stop_signal import StopRequest
        from engine.trainer import ProgressMeter, prepare_run
        self.run, self.progress = prepare_run(cfg)
        self.stop = StopRequest()             # not installed: signum stays 0
        self.meter = ProgressMeter(10 ** 9, self.run.global_batch, 0)

    def step(self, batches: Sequence) -> Callable[[int], None]:
        from engine.trainer import train_step

        def one(i: int) -> None:
            train_step(self.run, self.progress, [batches[i % len(batches)]], self.stop,
                       self.meter)
            if i % 10 == 9:
                self.meter.flush()            # a progress line's read, every 10 steps
        return one

    def loader_window(self, steps: int) -> Callable[[int], None]:
        """A fresh loader iterator with its first batch taken (not timed), then ``steps``."""
        from engine.trainer import train_step
        iterator = iter(self.run.loader)
        first = [next(iterator)]
        feed = itertools.chain(first, iterator)

        def one(i: int) -> None:
            train_step(self.run, self.progress, itertools.islice(feed, 1), self.stop,
                       self.meter)
            if i % 10 == 9:
                self.meter.flush()
        return one


def device_batches(run, count: int) -> List[Tuple]:
    """``count`` loader batches kept in memory: images and labels on the device, index and
    flipped on the host (where the trainer reads them)."""
    batches = []
    for images, labels, index, flipped in itertools.islice(iter(run.loader), count):
        batches.append((images.to(run.device), labels.to(run.device), index, flipped))
    return batches


# ------------------------------------------------------------------ timing

def images_per_second(step: Callable[[int], None], steps: int, batch: int,
                      device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    synchronize(device)
    return steps * batch / (time.perf_counter() - start)


class Table:
    """Rounds of images/s per (setting, column)."""

    def __init__(self) -> None:
        self.samples: Dict[Tuple[str, str], List[float]] = {}

    def add(self, key: Tuple[str, str], value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def median(self, key) -> Optional[float]:
        values = self.samples.get(key)
        return statistics.median(values) if values else None

    def cell(self, key) -> str:
        values = self.samples.get(key)
        if not values:
            return "-"
        return f"{min(values):,.0f} / {statistics.median(values):,.0f}"


def run_bench(args, scale: Scale, device: torch.device, plan: List[Setting],
              on_round: Callable[[Dict], None]) -> Dict:
    work = os.path.abspath(args.workdir)
    cached = any(s.teacher == "cached" for s in plan)
    started = time.perf_counter()
    common = prepare_work(work, scale, device, cached, args.num_workers,
                          window=max(args.steps, args.warmup) + 1)
    print(f"gpu_throughput: {device}, student {scale.student}, teacher {scale.teacher}, "
          f"{scale.num_classes} classes, batch {scale.batch}, {len(plan)} settings, "
          f"{args.rounds} rounds x {args.steps} steps (data, teacher"
          f"{', cache' if cached else ''}: {time.perf_counter() - started:.0f} s)", flush=True)
    ours: Dict[Setting, OurRun] = {}
    upstream: Dict[Tuple[str, str, str], UpstreamStep] = {}
    batches = None
    for setting in plan:
        distill = ROWS[setting.row][0]
        values = dict(common, distill=distill, output=os.path.join(work, "runs", setting.tag),
                      compile=False if setting.compile == "off" else (
                          True if setting.compile == "default" else setting.compile),
                      **precision_values(setting, device))
        if setting.teacher != "cached":
            values.pop("teacher_cache", None)
        if distill == "none":
            values["margin_list"] = (1.0, 0.5, 0.0)
        cfg = write_config(work, setting.tag, **values)
        ours[setting] = OurRun(setting, cfg)
        if batches is None:
            batches = device_batches(ours[setting].run, args.batches)
        key = (setting.teacher, setting.precision, setting.compile)
        if key not in upstream:
            upstream[key] = UpstreamStep(setting, scale, cfg, device)
    logging.getLogger().setLevel(logging.WARNING)    # the runs' start-up lines are written
    table = Table()
    result: Dict = {}
    # the plain settings' rounds first, then the compiled ones' (compilation is slow: a run cut
    # short by a time limit still leaves every finished round in the table)
    groups = [[s for s in plan if s.compile == "off"], [s for s in plan if s.compile != "off"]]
    done: List[Setting] = []
    for group in (g for g in groups if g):
        for round_index in range(args.rounds + 1):   # round 0: warm-up (and compilation)
            steps = args.warmup if round_index == 0 else args.steps
            for setting in group:
                ups = upstream[(setting.teacher, setting.precision, setting.compile)]
                columns = {"a": lambda i, u=ups: u(batches[i % len(batches)]),
                           "b": ours[setting].step(batches),
                           "c": ours[setting].loader_window(steps)}
                for column, step in columns.items():
                    value = images_per_second(step, steps, scale.batch, device)
                    if round_index:
                        table.add((setting.tag, column), value)
            print(f"  {'compiled' if group[0].compile != 'off' else 'plain'} settings: round "
                  f"{round_index}{' (warm-up)' if round_index == 0 else ''} done "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
            if round_index:
                result = summarize(table, done + group, device, scale, args, round_index,
                                   started)
                on_round(result)
        done += group
    return result


def summarize(table: Table, plan: List[Setting], device: torch.device, scale: Scale, args,
              rounds: int, started: float) -> Dict:
    result = {"device": str(device), "scale": scale.__dict__, "rounds": rounds,
              "steps": args.steps, "rows": [], "seconds": time.perf_counter() - started}
    for setting in plan:
        a, b, c = (table.median((setting.tag, col)) for col in "abc")
        result["rows"].append({
            "row": setting.row, "precision": setting.precision, "compile": setting.compile,
            **{col: table.samples.get((setting.tag, col)) for col in "abc"},
            "b/a": b / a if a and b else None, "c/b": c / b if b and c else None,
            "cells": [table.cell((setting.tag, col)) for col in "abc"]})
    return result


# ------------------------------------------------------------------ upstream's own train_v2

SHIM = '''"""Stand-ins so that upstream arcface_torch's train_v2 imports on a current stack (written
by kdface's bench/gpu_throughput.py; synthetic mode uses none of what they replace)."""
import importlib, inspect, sys, types


def _stand_in(name):
    module = types.ModuleType(name)
    module.__path__ = []

    def attribute(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        child = sys.modules.get(f"{name}.{attr}") or _stand_in(f"{name}.{attr}")
        setattr(module, attr, child)
        return child
    module.__getattr__ = attribute
    sys.modules[name] = module
    return module


class _Finder:
    """Imports of a stood-in package's submodules get stand-ins too."""
    def find_spec(self, fullname, path=None, target=None):
        root = fullname.split(".")[0]
        if root in _STOOD_IN and fullname not in sys.modules:
            import importlib.machinery
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return _stand_in(spec.name)

    def exec_module(self, module):
        pass


_STOOD_IN = set()
for _name in ("mxnet", "torchvision"):
    try:
        importlib.import_module(_name)
    except Exception:
        _STOOD_IN.add(_name)
        _stand_in(_name)
if _STOOD_IN:
    sys.meta_path.insert(0, _Finder())

import torch.optim.lr_scheduler as _schedulers
_init = _schedulers.LRScheduler.__init__
if "verbose" not in inspect.signature(_init).parameters:
    def _without_verbose(self, *args, verbose=None, **kwargs):
        _init(self, *args, **kwargs)
    _schedulers.LRScheduler.__init__ = _without_verbose
'''


def run_upstream(path: str, precision: str, scale: Scale, lines: int, timeout: float
                 ) -> Dict:
    """Upstream's own train_v2.py on a copy of ``path``'s arcface_torch, synthetic data, network
    mbf; the samples/s of its progress lines after the first one (or the error)."""
    source = path if os.path.isfile(os.path.join(path, "train_v2.py")) else os.path.join(
        path, "recognition", "arcface_torch")
    if not os.path.isfile(os.path.join(source, "train_v2.py")):
        return {"error": f"{path}: no train_v2.py (give an insightface checkout or its "
                         f"recognition/arcface_torch folder)"}
    work = tempfile.mkdtemp(prefix="kdface_upstream_")
    try:
        copy = os.path.join(work, "arcface_torch")
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns("work_dirs", "*.pyc"))
        os.makedirs(os.path.join(work, "shim"))
        with open(os.path.join(work, "shim", "sitecustomize.py"), "w") as handle:
            handle.write(SHIM)
        frequent = 10
        with open(os.path.join(copy, "configs", "kdface_synthetic.py"), "w") as handle:
            handle.write("\n".join([
                "from easydict import EasyDict as edict", "config = edict()",
                "config.margin_list = (1.0, 0.5, 0.0)", "config.network = 'mbf'",
                "config.resume = False", f"config.output = {os.path.join(work, 'out')!r}",
                "config.embedding_size = 512", "config.sample_rate = 1.0",
                f"config.fp16 = {precision == 'fp16'}", "config.momentum = 0.9",
                "config.weight_decay = 1e-4", f"config.batch_size = {scale.batch}",
                "config.lr = 0.1", "config.verbose = 10 ** 9", f"config.frequent = {frequent}",
                "config.dali = False", "config.rec = 'synthetic'",
                f"config.num_classes = {scale.num_classes}", "config.num_image = 10 ** 6",
                "config.num_epoch = 1", "config.warmup_epoch = 0", "config.val_targets = []",
                "config.num_workers = 2", ""]))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [os.path.join(work, "shim"), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.Popen([sys.executable, "train_v2.py", "configs/kdface_synthetic"],
                                cwd=copy, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        speeds, tail, deadline = [], [], time.time() + timeout
        try:
            for line in proc.stdout:
                tail = (tail + [line.rstrip()])[-15:]
                if "Speed" in line and "samples/sec" in line:
                    speeds.append(float(line.split("Speed", 1)[1].split()[0]))
                if len(speeds) > lines or time.time() > deadline:
                    break
        finally:
            proc.kill()
            proc.wait()
        if len(speeds) < 2:
            return {"error": "no progress lines; its output ended with:\n    "
                             + "\n    ".join(tail)}
        return {"speeds": speeds[1:], "median": statistics.median(speeds[1:])}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ report

def markdown(result: Dict, upstream_runs: Dict[str, Dict]) -> str:
    scale = result["scale"]
    lines = [f"device {result['device']}: student {scale['student']}, teacher "
             f"{scale['teacher']}, {scale['num_classes']} classes, batch {scale['batch']}; "
             f"images/s min / median of {result['rounds']} interleaved rounds x "
             f"{result['steps']} steps", "",
             "| row | precision | compile | (a) upstream-style | (b) our step | "
             "(c) our loader | b/a | c/b |", "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        ratio = [f"{row[k]:.2f}" if row[k] else "-" for k in ("b/a", "c/b")]
        lines.append(f"| {row['row']} | {row['precision']} | {row['compile']} | "
                     f"{' | '.join(row['cells'])} | {' | '.join(ratio)} |")
    for precision, found in upstream_runs.items():
        lines.append("")
        if "error" in found:
            lines.append(f"upstream's own train_v2 (mbf, synthetic, {precision}): FAILED: "
                         f"{found['error']}")
        else:
            lines.append(f"upstream's own train_v2 (mbf, synthetic, {precision}): "
                         f"{found['median']:,.0f} images/s (median of {len(found['speeds'])} "
                         f"progress lines)")
    lines.append("")
    lines.append(f"total {result['seconds']:.0f} s")
    return "\n".join(lines)


def build_plan(args, quick: bool) -> List[Setting]:
    if args.rows or args.precisions or args.compile:
        rows = (args.rows or ",".join(ROWS)).split(",")
        precisions = (args.precisions or "fp16,fp32").split(",")
        modes = (args.compile or "off").split(",")
        unknown = [r for r in rows if r not in ROWS]
        if unknown:
            raise SystemExit(f"--rows: unknown {unknown}; choose from {list(ROWS)}")
        return [Setting(r, p, c) for r in rows for p in precisions for c in modes]
    if quick:
        return [Setting(r, p, "off") for r in ROWS for p in ("fp32", "fp16")]
    return [Setting(*s) for s in GPU_PLAN]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny networks and data, few steps (the CPU test)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when available (required without --quick)")
    parser.add_argument("--rows", help=f"comma list of {list(ROWS)} (with --precisions and "
                                       f"--compile: their full product)")
    parser.add_argument("--precisions", help="comma list of fp16, fp32")
    parser.add_argument("--compile", help="comma list of off, default, reduce-overhead, "
                                          "max-autotune-no-cudagraphs")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round "
                                                                "(default 20; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default 5; 1 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="default 3; 2 with --quick")
    parser.add_argument("--batches", type=int, default=4,
                        help="distinct in-memory batches the steps cycle through")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="loader workers of column (c) (default: the config's; 0 with "
                             "--quick)")
    parser.add_argument("--arcface-torch", metavar="PATH",
                        help="also run upstream's own train_v2.py (synthetic) from this "
                             "insightface / arcface_torch checkout")
    parser.add_argument("--workdir", default=os.path.join("work_dirs", "gpu_throughput"))
    parser.add_argument("--out", help="write the table to OUT.md and OUT.json")
    args = parser.parse_args(argv)
    quick = args.quick
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    if args.device == "cpu" and not quick:
        raise SystemExit("no CUDA device: run with --quick for the CPU check")
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    args.steps = args.steps or (2 if quick else 20)
    args.warmup = args.warmup or (1 if quick else 5)
    args.rounds = args.rounds or (2 if quick else 3)
    if quick and args.num_workers is None:
        args.num_workers = 0
    scale = QUICK_SCALE if quick else GPU_SCALE
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    plan = build_plan(args, quick)

    def write(result: Dict, upstream_runs: Dict) -> str:
        text = markdown(result, upstream_runs)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out + ".md", "w") as handle:
                handle.write(text + "\n")
            with open(args.out + ".json", "w") as handle:
                json.dump(dict(result, upstream_train_v2=upstream_runs), handle, indent=1)
        return text

    result = run_bench(args, scale, device, plan, on_round=lambda r: write(r, {}))
    upstream_runs = {}
    if args.arcface_torch:
        for precision in sorted({s.precision for s in plan if s.row == "alone"}):
            upstream_runs[precision] = run_upstream(args.arcface_torch, precision, scale,
                                                    lines=args.rounds * 2, timeout=300)
    print(write(result, upstream_runs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
