"""GPU acceptance run: every stage of the product once, on synthetic data in the real formats.

    python bench/gpu_acceptance.py                       # one GPU (about 3-5 minutes)
    python bench/gpu_acceptance.py --nproc 8             # 8 GPUs through torchrun (nccl)
    python bench/gpu_acceptance.py --device cpu --quick  # tiny networks, a few steps (the tests)

Stages, each printed as a PASS / FAIL line (a stage whose input failed is FAIL "skipped"):

  data         synthetic faces: train.rec/.idx/property + an IJB-C-style folder (tools/synthetic)
  teacher      an r50 teacher checkpoint (model.pt) and a [C, D] teacher classifier (random
               weights: this run checks the machinery, not accuracy)
  adadistill   mobilefacenet from the r50 teacher, fp16 + GradScaler, channels_last: the first
               half of the steps (a checkpoint at the half) ...
  adadistill-resume   ... then ``--resume`` to the end (must continue from the half)
               Every training run spans more than one epoch (epoch-end checkpoints among the
               step ones, of which the trainer keeps two); each must end with the checkpoint of
               its last step.
  gkd, gkd-resume     the same with GKD (teacher classifier, top-k grouped KD)
  cache-build  ``train_distill.py --build-teacher-cache`` (the teacher in fp16)
  cached       the AdaDistill run again from the cache
  ijbc         ``eval/eval_ijbc.py`` on the AdaDistill student and the synthetic IJB-C folder
  onnx         ``eval/export_onnx.py --check-mfr`` (onnxruntime and insightface checks)

Then it prints samples/s of each training stage (median of the progress lines after the first),
the peak memory (GPU: torch.cuda.max_memory_allocated over the ranks; CPU: the process's peak
RSS), the cached/online step-time ratio (median samples/s online / cached, from the same run),
and exits 1 when any stage failed.

Training and evaluation go through the real entry points (``train_distill.py``,
``eval/eval_ijbc.py``, ``eval/export_onnx.py``): as subprocesses (``--launch subprocess``, the
default on GPUs; ``torchrun`` when ``--nproc`` > 1) or by calling their ``main`` in this process
(``--launch inprocess``, the default with ``--quick``: one interpreter start instead of ten).
On a CPU the configs set ``amp_dtype = "float16"`` and ``channels_last = True``, so the CPU run
executes the GPU recipe's float16 autocast, GradScaler and channels_last lines.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

MARKER = ".gpu_acceptance"          # a work folder this script made (safe to clear)
SPEED = re.compile(r"Speed ([0-9.]+) samples/sec\s+Loss (\S+).*?Global Step: (\d+)")


# ------------------------------------------------------------------ child side (one run)

def child_main(argv: List[str]) -> int:
    """``--child <peak.json> <entry> args...``: run one entry point in this process and record
    its peak memory (called under torchrun on every rank, or in-process)."""
    peak_file, entry, args = argv[0], argv[1], argv[2:]
    code = run_entry(entry, args)
    rank = int(os.environ.get("RANK", 0))
    with open(f"{peak_file}.rank{rank}", "w") as handle:
        json.dump(peak_memory(), handle)
    return code


def run_entry(entry: str, args: List[str]) -> int:
    """Call an entry point's ``main(args)``; returns 0, or the SystemExit code."""
    if entry == "train":
        import train_distill as module
    elif entry == "ijbc":
        from eval import eval_ijbc as module
    elif entry == "onnx":
        from eval import export_onnx as module
    else:
        raise ValueError(f"unknown entry {entry!r}")
    try:
        module.main(args)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return 0


def peak_memory() -> Dict[str, float]:
    import torch
    if torch.cuda.is_available():
        return {"kind": "gpu", "bytes": float(torch.cuda.max_memory_allocated())}
    return {"kind": "host_rss", "bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            * 1024}


def reset_peak_memory() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------ driver

class Acceptance:
    """Runs the stages in order and keeps their results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = os.path.abspath(args.workdir)
        self.results: Dict[str, Dict] = {}
        self.quick = args.quick
        self.cpu = args.device == "cpu"
        self.steps = args.steps or (6 if self.quick else 200)
        self.half = self.steps // 2
        if self.half < 1:
            raise SystemExit("--steps must be >= 2 (a checkpoint and --resume in the middle)")
        self.student = "tiny_s" if self.quick else "mobilefacenet"
        self.teacher = "tiny_t" if self.quick else "r50"
        self.dim = 64 if self.quick else 512
        self.num_ids = args.num_ids or (8 if self.quick else 600)
        # every training run spans more than one epoch (quick: 2 steps an epoch; default: 93)
        self.per_id = 2 if self.quick else 20
        self.batch = args.batch_size or (8 if self.quick else 128)

    # -- plumbing

    def stage(self, name: str, needs: List[str], fn: Callable[[], str]) -> None:
        missing = [n for n in needs if not self.results.get(n, {}).get("ok")]
        start = time.perf_counter()
        if missing:
            ok, detail = False, f"skipped: needs {', '.join(missing)}"
        else:
            try:
                ok, detail = True, fn() or ""
            except Exception as error:  # noqa: BLE001 -- every failure becomes a FAIL line
                ok, detail = False, f"{type(error).__name__}: {error}"
                if self.args.verbose:
                    traceback.print_exc()
        seconds = time.perf_counter() - start
        self.results[name] = {"ok": ok, "detail": detail, "seconds": seconds}
        print(f"[{'PASS' if ok else 'FAIL'}] {name:<18} {seconds:7.1f} s  {detail}", flush=True)

    def launch(self, entry: str, args: List[str], tag: str) -> Dict:
        """Run one entry point (train/ijbc/onnx) in the work folder; raise on failure.
        Returns the peak memory over the ranks."""
        peak_file = os.path.join(self.work, "peaks", tag)
        os.makedirs(os.path.dirname(peak_file), exist_ok=True)
        log_file = os.path.join(self.work, "logs", f"{tag}.log")
        os.makedirs(os.path.dirname(log_file), exist_ok=True)
        if self.args.launch == "inprocess":
            cwd = os.getcwd()
            os.chdir(self.work)
            try:
                reset_peak_memory()
                code = child_main([peak_file, entry] + args)
            finally:
                os.chdir(cwd)
        else:
            nproc = self.args.nproc if entry == "train" else 1
            runner = [sys.executable]
            if nproc > 1:
                runner += ["-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}"]
            cmd = runner + [os.path.abspath(__file__), "--child", peak_file, entry] + args
            with open(log_file, "w") as log:
                code = subprocess.call(cmd, cwd=self.work, stdout=log, stderr=subprocess.STDOUT)
        if code != 0:
            tail = ""
            if os.path.isfile(log_file):
                tail = open(log_file).read()[-1500:]
            raise RuntimeError(f"{entry} {' '.join(args)} exited with {code} (log {log_file})"
                               + (f"\n{tail}" if tail else ""))
        peaks = []
        for name in os.listdir(os.path.dirname(peak_file)):
            if name.startswith(os.path.basename(peak_file) + ".rank"):
                with open(os.path.join(os.path.dirname(peak_file), name)) as handle:
                    peaks.append(json.load(handle))
        return max(peaks, key=lambda p: p["bytes"]) if peaks else {}

    def write_config(self, name: str, **values) -> str:
        lines = ["from easydict import EasyDict as edict", "config = edict()"]
        lines += [f"config.{key} = {value!r}" for key, value in values.items()]
        path = os.path.join(self.work, "configs", f"{name}.py")
        with open(path + ".tmp", "w") as handle:
            handle.write("\n".join(lines) + "\n")
        os.replace(path + ".tmp", path)
        return f"configs/{name}"

    def base_config(self, name: str, **overrides) -> dict:
        values = dict(
            network=self.student, teacher_network=self.teacher, embedding_size=self.dim,
            teacher_embedding_size=self.dim,
            teacher_checkpoint=os.path.join(self.work, "teacher", "model.pt"),
            margin_list=(1.0, 0.0, 0.35), margin_scale=16.0 if self.quick else 64.0,
            rec=os.path.join(self.work, "data", "train"), num_classes=self.num_ids,
            num_image=self.num_ids * self.per_id, num_epoch=10 ** 6, max_steps=self.half,
            batch_size=self.batch, lr=0.1, lr_schedule="step", lr_steps=(), warmup_epoch=0,
            fp16=True, teacher_fp16=True,
            # the GPU recipe's dtype on every device: float16 + GradScaler, channels_last
            amp_dtype="float16", channels_last=True,
            num_workers=0 if self.quick else "auto", val_targets=[], verbose=10 ** 9,
            frequent=1 if self.quick else 10, save_every=self.half, seed=0,
            output=os.path.join(self.work, "runs", name))
        values.update(overrides)
        return values

    def log_speeds(self, output: str, offset: int) -> Tuple[List[float], int]:
        """samples/s of the progress lines written after ``offset``, the first one dropped
        (start-up), and the final step."""
        path = os.path.join(output, "training.log")
        with open(path) as handle:
            handle.seek(offset)
            found = SPEED.findall(handle.read())
        if not found:
            raise RuntimeError(f"{path}: no progress line")
        for _, loss, _ in found:
            if not float(loss) == float(loss) or float(loss) in (float("inf"), float("-inf")):
                raise RuntimeError(f"{path}: non-finite loss {loss}")
        speeds = [float(s) for s, _, _ in found]
        return (speeds[1:] or speeds), int(found[-1][2])

    def train_stage(self, name: str, values: dict, resume: bool) -> str:
        config = self.write_config(name, **values)
        log = os.path.join(values["output"], "training.log")
        offset = os.path.getsize(log) if os.path.isfile(log) else 0
        tag = f"{name}-resume" if resume else name
        peak = self.launch("train", [config] + (["--resume"] if resume else []), tag)
        speeds, last_step = self.log_speeds(values["output"], offset)
        if last_step != values["max_steps"]:
            raise RuntimeError(f"stopped at step {last_step}, expected {values['max_steps']}")
        text = open(log).read()[offset:]
        if resume and f"step {self.half}," not in text.split("resumed from", 1)[-1][:400]:
            raise RuntimeError(f"{log}: the run did not resume from step {self.half}")
        if values["fp16"] and "Fp16 Grad Scale" not in text:
            raise RuntimeError(f"{log}: no GradScaler scale in the progress lines")
        # the checkpoint of the run's last step (the one --resume continues from, after the
        # first half); older ones may be gone: the trainer keeps keep_checkpoints (2) of them,
        # and a run longer than an epoch also writes one at every epoch end
        ckpt = os.path.join(values["output"], "checkpoints", f"step_{values['max_steps']:09d}")
        if not os.path.isdir(ckpt):
            raise RuntimeError(f"no checkpoint {ckpt} of the run's last step")
        self.metrics.setdefault(name, {"speeds": [], "peak": {}})
        self.metrics[name]["speeds"] += speeds
        if peak and peak.get("bytes", 0) >= self.metrics[name]["peak"].get("bytes", 0):
            self.metrics[name]["peak"] = peak
        return (f"{last_step} steps, {statistics.median(speeds):.1f} samples/s"
                + (", resumed from the checkpoint" if resume else ""))

    # -- stages

    def run(self) -> int:
        self.metrics: Dict[str, Dict] = {}
        self.prepare_workdir()
        print(f"gpu_acceptance: device {self.args.device}, {self.args.nproc} process(es), "
              f"{self.steps} steps, student {self.student}, teacher {self.teacher}, "
              f"launch {self.args.launch}, work folder {self.work}", flush=True)
        self.stage("data", [], self.make_data)
        self.stage("teacher", ["data"], self.make_teacher)
        ada = self.base_config("adadistill", distill="adadistill")
        self.stage("adadistill", ["data", "teacher"],
                   lambda: self.train_stage("adadistill", ada, resume=False))
        self.stage("adadistill-resume", ["adadistill"],
                   lambda: self.train_stage("adadistill", dict(ada, max_steps=self.steps),
                                            resume=True))
        gkd = self.base_config("gkd", distill="gkd",
                               teacher_classifier=os.path.join(self.work, "teacher",
                                                               "classifier.pt"),
                               gkd_k=max(1, min(10000, self.num_ids // 4)), gkd_warmup_epochs=0)
        self.stage("gkd", ["data", "teacher"], lambda: self.train_stage("gkd", gkd, resume=False))
        self.stage("gkd-resume", ["gkd"],
                   lambda: self.train_stage("gkd", dict(gkd, max_steps=self.steps), resume=True))
        cached = dict(ada, teacher_cache=os.path.join(self.work, "teacher_cache"),
                      output=os.path.join(self.work, "runs", "cached"), max_steps=self.steps)
        self.stage("cache-build", ["data", "teacher"], lambda: self.build_cache(cached))
        self.stage("cached", ["cache-build"],
                   lambda: self.train_stage("cached", cached, resume=False))
        student = os.path.join(ada["output"], "model.pt")
        self.stage("ijbc", ["adadistill-resume"], lambda: self.eval_ijbc(student))
        self.stage("onnx", ["adadistill-resume"], lambda: self.export_onnx(student))
        return self.report()

    def prepare_workdir(self) -> None:
        if os.path.exists(self.work):
            if not os.path.isfile(os.path.join(self.work, MARKER)):
                raise SystemExit(f"{self.work} exists and was not made by this script; "
                                 f"pass another --workdir")
            shutil.rmtree(self.work)
        os.makedirs(os.path.join(self.work, "configs"))
        open(os.path.join(self.work, MARKER), "w").close()
        shutil.copy(os.path.join(REPO, "configs", "base.py"),
                    os.path.join(self.work, "configs", "base.py"))

    def make_data(self) -> str:
        from tools.synthetic import write_ijb, write_train_set
        workers = 1 if self.quick else max(1, min(8, (os.cpu_count() or 1) - 1))
        write_train_set(os.path.join(self.work, "data", "train"), self.num_ids, self.per_id,
                        seed=0, workers=workers)
        ijb = write_ijb(os.path.join(self.work, "data", "IJBC"), "IJBC",
                        num_ids=6 if self.quick else 40,
                        templates_per_id=2, medias_per_template=1 if self.quick else 2,
                        images_per_media=1 if self.quick else 2, seed=1)
        return (f"{self.num_ids * self.per_id} training images of {self.num_ids} identities, "
                f"IJB-C folder ({ijb.get('num_images', '?')} images)")

    def make_teacher(self) -> str:
        """Random weights whose BatchNorm statistics are those of the synthetic faces: a raw random
        r50 outputs ~1e26 (inf in float16); calibrated, its activations are O(1)."""
        import torch
        from plugins.atomic_io import atomic_torch_save
        from data.dataset import FaceRecordDataset
        from plugins.backbones import get_model
        torch.manual_seed(0)
        device = "cpu" if self.cpu else "cuda"
        model = get_model(self.teacher, num_features=self.dim).to(device)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None            # a plain average over the calibration batches
        dataset = FaceRecordDataset(os.path.join(self.work, "data", "train"),
                                    num_classes=self.num_ids, flip=False)
        count = min(len(dataset), 16 if self.quick else 256)
        images = torch.stack([dataset[i][0] for i in range(count)]).to(device)
        model.train()
        with torch.no_grad():
            for batch in images.split(8 if self.quick else 64):
                model(batch)
            model.eval()
            out = model(images[:8])
        if not torch.isfinite(out).all() or out.abs().max() > 1e3:
            raise RuntimeError(f"calibrated teacher outputs up to {out.abs().max():.3g}")
        model = model.cpu()
        os.makedirs(os.path.join(self.work, "teacher"))
        atomic_torch_save(model.state_dict(), os.path.join(self.work, "teacher", "model.pt"))
        classifier = torch.nn.functional.normalize(torch.randn(self.num_ids, self.dim), dim=1)
        atomic_torch_save(classifier, os.path.join(self.work, "teacher", "classifier.pt"))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        return f"{self.teacher} ({params:.1f}M parameters), classifier [{self.num_ids}, {self.dim}]"

    def build_cache(self, values: dict) -> str:
        config = self.write_config("cached", **values)
        peak = self.launch("train", [config, "--build-teacher-cache"], "cache-build")
        with open(os.path.join(values["teacher_cache"], "meta.json")) as handle:
            meta = json.load(handle)
        if meta.get("complete") is not True:
            raise RuntimeError(f"{values['teacher_cache']}/meta.json is not complete")
        self.metrics["cache-build"] = {"speeds": [], "peak": peak}
        return f"{meta.get('num_images')} images x 2 embeddings, complete"

    def eval_ijbc(self, model: str) -> str:
        result_dir = os.path.join(self.work, "results")
        self.launch("ijbc", ["--model-prefix", model, "--network", self.student,
                             "--num-features", str(self.dim), "--image-path",
                             os.path.join(self.work, "data", "IJBC"), "--result-dir", result_dir,
                             "--job", "acceptance", "--target", "IJBC", "--batch-size", "32",
                             "--num-workers", "0" if self.quick else "4", "--no-progress",
                             "--device", "cpu" if self.cpu else "cuda"], "ijbc")
        with open(os.path.join(result_dir, "acceptance", "ijbc.json")) as handle:
            payload = json.load(handle)
        tar = payload.get("tar_at_far") or {}
        values = [v for v in tar.values() if isinstance(v, (int, float))]
        if not values or any(not 0 <= v <= 100 for v in values):
            raise RuntimeError(f"ijbc.json has no valid tar_at_far: {tar}")
        return "TAR@FAR " + ", ".join(f"{k}: {v:.1f}" for k, v in list(tar.items())[-3:])

    def export_onnx(self, model: str) -> str:
        out = os.path.join(self.work, "student.onnx")
        self.launch("onnx", ["--model-prefix", model, "--network", self.student,
                             "--num-features", str(self.dim), "--output", out, "--check-mfr"],
                    "onnx")
        if not os.path.isfile(out):
            raise RuntimeError(f"{out} was not written")
        return f"{out} ({os.path.getsize(out) / 2 ** 20:.1f} MiB), checks passed"

    # -- summary

    def report(self) -> int:
        print("\nmeasured (median samples/s over the progress lines after the first one):")
        for name, metric in self.metrics.items():
            speed = (f"{statistics.median(metric['speeds']):10.1f} samples/s"
                     if metric["speeds"] else " " * 20)
            peak = metric.get("peak") or {}
            memory = (f"peak {'GPU memory' if peak.get('kind') == 'gpu' else 'host RSS'} "
                      f"{peak['bytes'] / 2 ** 20:.0f} MiB" if peak else "")
            print(f"  {name:<12} {speed}   {memory}")
        online = self.metrics.get("adadistill", {}).get("speeds")
        cached = self.metrics.get("cached", {}).get("speeds")
        if online and cached:
            ratio = statistics.median(online) / statistics.median(cached)
            print(f"  cached/online step time: {ratio:.2f} (AdaDistill, same config)")
        failed = [name for name, result in self.results.items() if not result["ok"]]
        passed = len(self.results) - len(failed)
        print(f"\n{passed} passed, {len(failed)} failed" + (f": {', '.join(failed)}"
                                                             if failed else ""))
        return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="cuda (default when available) or cpu")
    parser.add_argument("--nproc", type=int, default=1,
                        help="training processes (GPUs); > 1 launches torchrun")
    parser.add_argument("--quick", action="store_true",
                        help="tiny networks, few images and steps (the CPU test)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per training run (default 200; 6 with --quick)")
    parser.add_argument("--num-ids", type=int, default=None, help="synthetic identities")
    parser.add_argument("--batch-size", type=int, default=None, help="per-process batch")
    parser.add_argument("--launch", choices=("subprocess", "inprocess"), default=None,
                        help="entry points as subprocesses (default) or in this process "
                             "(default with --quick; needs --nproc 1)")
    parser.add_argument("--workdir", default=os.path.join("work_dirs", "gpu_acceptance"),
                        help="work folder (cleared when this script made it)")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child_main(argv[1:])
    args = build_parser().parse_args(argv)
    import torch
    if args.device is None:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --device cpu --quick for the CPU check")
        args.device = "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    if args.device == "cpu" and torch.cuda.is_available():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""   # the entry points pick CUDA when they see it
        if args.launch == "inprocess" or (args.launch is None and args.quick):
            raise SystemExit("--device cpu on a CUDA machine needs --launch subprocess")
    if args.launch is None:
        args.launch = "inprocess" if args.quick and args.nproc == 1 else "subprocess"
    if args.launch == "inprocess" and args.nproc != 1:
        raise SystemExit("--launch inprocess runs one process: use --nproc 1")
    if args.device == "cuda" and args.nproc > torch.cuda.device_count():
        raise SystemExit(f"--nproc {args.nproc} but {torch.cuda.device_count()} GPU(s) visible")
    return Acceptance(args).run()


if __name__ == "__main__":
    sys.exit(main())
