"""The CPU demo behind `make demo`: synthetic faces -> a teacher -> students trained alone, with
AdaDistill and with GKD, each student with several seeds -> tables comparing them on synthetic
LFW (10-fold accuracy) and on a synthetic IJB-C folder (TAR@FAR 1e-4 / 1e-3 / 1e-2), identities
unseen in training, and each distilled student's difference to the student alone of the same
seed (mean +- std over the seeds).

    python -m tools.demo [--seeds 0,1,2] [--jobs N] [--isa avx2|native] [--quick] [--output DIR]

The runs are the job configs configs/demo_{teacher,student,adadistill,gkd}.py: the teacher once
(its seed), each student once per seed (``--seeds``), in ``--jobs`` processes side by side
(default: one per core); the distilled students read the teacher's embedding cache, built once
after the teacher.  Everything lands in work_dirs/demo/ (``--output``): data, one folder per run
(``<run>/seed_<k>/`` for the students), ``results.json`` and ``results.md`` (the tables as
printed, to paste into README).  --quick shrinks everything, for tests.

Determinism: the printed metrics are the same on every run of the same command with the same
packages (requirements-lock.txt; the demo says when the installed ones differ) on any x86-64 CPU
with AVX2 that runs the same kernels (checked on one machine, AVX2 and AVX-512; README).  What that
needs, and what the demo pins: ONE intra-op thread per run (``--threads``; torch reduces in
another order with another thread count), the AVX2 kernels in torch, oneDNN and MKL (``--isa``,
``ISA_PINS``; AVX-512 kernels give other numbers), each run in its own process so that ``--jobs``
only changes the wall time, no DataLoader workers, the seeds of the configs and of ``--seeds``,
and the synthetic data's generator seed.  Timings are printed but are not part of that promise.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import resource
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

from tools.cpu_isa import ISA_PINS, pinned_environment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER, BASELINE = "teacher", "student alone"
RUNS = ((TEACHER, "demo_teacher"), (BASELINE, "demo_student"), ("AdaDistill", "demo_adadistill"),
        ("GKD", "demo_gkd"))
SEEDS = (0, 1, 2)
FARS = (1e-4, 1e-3, 1e-2)
HEADLINE = "tar@0.001"
METRICS = {"lfw_accuracy": "synthetic LFW acc", "tar@0.0001": "IJB-C TAR@FAR=1e-4",
           "tar@0.001": "IJB-C TAR@FAR=1e-3", "tar@0.01": "IJB-C TAR@FAR=1e-2"}
IJB_FULL = {"num_ids": 100, "templates_per_id": 4, "medias_per_template": 2,
            "images_per_media": 1, "impostor_ratio": 100}
IJB_QUICK = {"num_ids": 6, "templates_per_id": 2, "medias_per_template": 1,
             "images_per_media": 1, "impostor_ratio": 10}
QUICK = {"num_classes": 20, "num_image": 200, "max_steps": 4, "batch_size": 16, "gkd_k": 5}
PATH_KEYS = ("output", "rec", "teacher_checkpoint", "teacher_classifier", "teacher_cache")


def make_data(cfg, images_per_id: int, pairs: int, ijb: Dict[str, int], workers: int) -> None:
    """Write the demo's training set, lfw.bin and IJBC/ (identities disjoint from training)
    once (rendering in ``workers`` processes gives identical files)."""
    from tools.synthetic import write_ijb, write_train_set, write_verification_bin

    marker = os.path.join(cfg.rec, f"demo_{cfg.num_classes}x{images_per_id}_{pairs}_ijb"
                                   f"{ijb['num_ids']}x{ijb['templates_per_id']}.done")
    if os.path.isfile(marker):
        print(f"[demo] synthetic data already in {cfg.rec}", flush=True)
        return
    print(f"[demo] writing {cfg.num_classes} identities x {images_per_id} images to {cfg.rec}",
          flush=True)
    write_train_set(cfg.rec, cfg.num_classes, images_per_id, seed=0, workers=workers,
                    verbose=True)
    write_verification_bin(os.path.join(cfg.rec, "lfw.bin"), pairs, seed=0, num_ids=100,
                           verbose=True)
    write_ijb(os.path.join(cfg.rec, "IJBC"), "IJBC", seed=0, verbose=True, **ijb)
    open(marker, "w").close()


def job_config(job: Mapping[str, Any]):
    """The trainer config of one job ``{"run", "config", "seed", "root", "quick"}``:
    ``configs/<config>.py`` with ``work_dirs/demo`` replaced by ``root``, the students' seed and
    ``<output>/seed_<k>`` folder, and the --quick sizes."""
    from engine.config import get_config

    cfg = get_config(f"configs/{job['config']}", root=REPO)
    for key in PATH_KEYS:
        if cfg.get(key):
            cfg[key] = cfg[key].replace("work_dirs/demo", job["root"], 1)
    if job["run"] != TEACHER:
        cfg.seed = job["seed"]
        cfg.output = os.path.join(cfg.output, f"seed_{job['seed']}")
    if job["quick"]:
        cfg.update(QUICK)
    cfg.start_over = True          # the demo retrains from scratch each time it runs
    return cfg


def run_job(job: Mapping[str, Any]) -> Dict[str, Any]:
    """Train one run (the teacher also builds its embedding cache, replacing one of an earlier
    teacher), evaluate it; return its row: metrics in percent, loss, steps, the kernels torch
    ran (``cpu_capability``), wall and CPU seconds."""
    from tools.kd_bench_jobs import ijb_tar_at_far, load_trained, pin_process

    pin_process(job["threads"])
    import torch

    from engine.trainer import train
    from eval.ijb import far_key

    cfg = job_config(job)
    start, cpu0 = time.time(), _cpu_seconds()
    summary = train(cfg)
    if job["run"] == TEACHER:
        from engine.teacher_cache_build import build_from_config
        build_from_config(dict(cfg, teacher_network=cfg.network,
                               teacher_embedding_size=cfg.embedding_size,
                               teacher_checkpoint=os.path.join(cfg.output, "model.pt"),
                               teacher_cache=os.path.join(cfg.output, "embedding_cache"),
                               teacher_fp16=False), overwrite=True, dtype="float32")
    accuracy, std, _ = summary["verification"]["lfw"]
    ijb = ijb_tar_at_far(load_trained(cfg.network, cfg.embedding_size, cfg.output),
                         os.path.join(cfg.rec, "IJBC"), "IJBC", FARS)
    return {"run": job["run"], "seed": cfg.seed, "network": cfg.network,
            "distill": cfg.distill, "lfw_accuracy": accuracy, "lfw_std": std,
            **{f"tar@{far_key(f)}": ijb[f"tar@{far_key(f)}"] for f in FARS},
            "loss": summary["loss"], "steps": summary["steps"], "output": cfg.output,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "seconds": round(time.time() - start, 1),
            "cpu_seconds": round(_cpu_seconds() - cpu0, 1)}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _quiet_worker(log_path: str) -> None:
    """Pool initializer: the console output of the jobs run by this process (progress lines,
    progress bars, warnings) goes to ``log_path``, not to the demo's console, where two jobs
    would interleave (each run's training.log has its own lines; a job's exception reaches the
    demo through its future)."""
    handle = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)


def run_all(jobs: Sequence[Mapping[str, Any]], workers: int, log_path: str,
            pins: Mapping[str, str]) -> List[Dict[str, Any]]:
    """Run ``jobs`` in ``workers`` fresh (spawn) processes started with the environment
    variables ``pins`` (the instruction set, ``ISA_PINS``) and their console output in
    ``log_path``: the teacher first, the students alone beside it, the distilled students once
    the teacher is done.  Returns the rows in the order they finished."""
    def report(row: Mapping[str, Any]) -> None:
        print(f"[demo] {row['run']}{'' if row['run'] == TEACHER else ' seed %d' % row['seed']}: "
              + ", ".join(f"{title} {row[key]:.2f}" for key, title in METRICS.items())
              + f" ({row['seconds']:.0f} s)", flush=True)

    teacher = [j for j in jobs if j["run"] == TEACHER]
    first = teacher + [j for j in jobs if j["run"] == BASELINE]
    later = [j for j in jobs if j not in first]
    rows = []
    with pinned_environment(pins), concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_quiet_worker, initargs=(log_path,)) as pool:
        futures = [pool.submit(run_job, job) for job in (first if teacher else first + later)]
        if teacher:
            rows.append(futures.pop(0).result())
            report(rows[-1])
            futures += [pool.submit(run_job, job) for job in later]
        for future in concurrent.futures.as_completed(futures):
            rows.append(future.result())
            report(rows[-1])
    return rows


def summarize(rows: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Per student run: mean +- std of every metric over its seeds and the per-seed values;
    per distilled run: the paired comparison with the student alone of the same seed
    (tools.kd_bench.paired_comparison: mean +- std of the differences, wins / losses)."""
    from tools.kd_bench import mean_std, paired_comparison

    teacher = next(r for r in rows if r["run"] == TEACHER)
    out: Dict[str, Any] = {"teacher": {k: teacher[k] for k in METRICS}, "runs": {}}
    by_run: Dict[str, Dict[int, Mapping[str, Any]]] = {}
    for row in rows:
        if row["run"] != TEACHER:
            by_run.setdefault(row["run"], {})[row["seed"]] = row
    for run, seeds in by_run.items():
        entry: Dict[str, Any] = {"seeds": sorted(seeds), "metrics": {}}
        for key in METRICS:
            values = {s: float(seeds[s][key]) for s in sorted(seeds)}
            mean, std = mean_std(list(values.values()))
            entry["metrics"][key] = {
                "mean": mean, "std": std, "values": values,
                "vs_student_alone": None if run == BASELINE else paired_comparison(
                    {s: float(r[key]) for s, r in by_run[BASELINE].items()}, values)}
        out["runs"][run] = entry
    return out


def markdown(summary: Mapping[str, Any], seeds: Sequence[int]) -> str:
    """The demo's tables (what it prints and README shows): the metrics (teacher: its one run;
    students: mean +- std over the seeds), the difference to the student alone of the same seed,
    and the headline TAR@FAR per seed."""
    head = " | ".join(f"{title} (%)" for title in METRICS.values())
    rule = "|---|" + "---|" * len(METRICS)
    runs = summary["runs"]
    seed_list = ", ".join(str(s) for s in seeds)
    lines = [f"| run (students: mean +- std over seeds {seed_list}) | {head} |", rule,
             "| teacher (one run) | " + " | ".join(f"{summary['teacher'][k]:.2f}"
                                                  for k in METRICS) + " |"]
    for run, entry in runs.items():
        lines.append(f"| {run} | " + " | ".join(
            f"{m['mean']:.2f} +- {m['std']:.2f}" for m in entry["metrics"].values()) + " |")
    lines += ["", "Difference to the student alone of the same seed, in points: mean +- std over "
              f"the {len(seeds)} seeds (seeds above / below):", "",
              "| run | " + " | ".join(METRICS.values()) + " |", rule]
    for run, entry in runs.items():
        if run == BASELINE:
            continue
        cells = []
        for m in entry["metrics"].values():
            paired = m["vs_student_alone"]
            cells.append(f"{paired['mean_diff']:+.2f} +- {paired['std_diff']:.2f} "
                         f"({paired['wins']}/{paired['losses']})")
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    lines += ["", f"{METRICS[HEADLINE]} (%) per seed:", "",
              "| run | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|" + "---|" * len(seeds)]
    for run, entry in runs.items():
        values = entry["metrics"][HEADLINE]["values"]
        lines.append(f"| {run} | " + " | ".join(f"{values[s]:.2f}" for s in seeds) + " |")
    return "\n".join(lines) + "\n"


def lock_differences() -> List[str]:
    """The differences between the installed packages and requirements-lock.txt (tools.lock)."""
    from tools.lock import LOCK_FILE, drift_report

    try:
        return drift_report(os.path.join(REPO, LOCK_FILE))
    except (OSError, ValueError) as err:
        return [f"cannot read the lock: {err}"]


def conditions(rows: Sequence[Mapping[str, Any]], isa: str, threads: int, drift: Sequence[str]
               ) -> str:
    """The line under the tables saying what the numbers were made with."""
    import torch

    capabilities = sorted({str(r["cpu_capability"]) for r in rows})
    packages = ("packages = requirements-lock.txt" if not drift else
                f"{len(drift)} package difference(s) from requirements-lock.txt")
    return (f"torch {torch.__version__}, kernels {'/'.join(capabilities)} (--isa {isa}), "
            f"{threads} intra-op thread(s) per run, {packages}")


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    from engine.runtime import available_cpus
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--output", default=None, help="work folder (default work_dirs/demo)")
    parser.add_argument("--seeds", default=",".join(str(s) for s in SEEDS),
                        help="comma-separated seeds of the students (README's: 0,1,2)")
    parser.add_argument("--jobs", type=int, default=available_cpus(),
                        help="runs side by side, one process each (the numbers do not depend "
                             "on it; default: one per core)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads per run (the numbers depend on it; README's: 1)")
    parser.add_argument("--isa", choices=sorted(ISA_PINS), default="avx2",
                        help="instruction set of the kernels (the numbers depend on it; "
                             "README's: avx2)")
    args = parser.parse_args(argv)
    try:
        seeds = sorted({int(s) for s in args.seeds.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if len(seeds) < 2:
        parser.error("--seeds needs at least 2 seeds (the spread over seeds is the point)")
    if args.threads < 1 or args.jobs < 1:
        parser.error("--threads and --jobs must be >= 1")

    start = time.time()
    root = args.output or ("work_dirs/demo_quick" if args.quick else "work_dirs/demo")
    drift = lock_differences()
    print("[demo] installed packages match requirements-lock.txt" if not drift else
          "[demo] WARNING: the installed packages differ from requirements-lock.txt (README's "
          "numbers were made with the lock):\n  " + "\n  ".join(drift), flush=True)
    jobs = [{"run": run, "config": name, "seed": None, "root": root, "quick": args.quick,
             "threads": args.threads} for run, name in RUNS[:1]]
    jobs += [{"run": run, "config": name, "seed": seed, "root": root, "quick": args.quick,
              "threads": args.threads} for run, name in RUNS[1:] for seed in seeds]
    first = job_config(jobs[0])
    make_data(first, first.num_image // first.num_classes, 40 if args.quick else 600,
              IJB_QUICK if args.quick else IJB_FULL, args.jobs)
    workers = min(args.jobs, len(jobs))
    log_path = os.path.join(root, "workers.log")
    print(f"[demo] {len(jobs)} runs (the teacher, {len(RUNS) - 1} students x {len(seeds)} "
          f"seeds), {workers} side by side, {args.threads} intra-op thread(s) and {args.isa} "
          f"kernels each; their output in {log_path} and each run's training.log", flush=True)

    rows = run_all(jobs, workers, log_path, ISA_PINS[args.isa])
    order = {run: i for i, (run, _) in enumerate(RUNS)}
    rows.sort(key=lambda r: (order[r["run"]], r["seed"] if r["seed"] is not None else -1))
    if args.isa == "avx2" and any(r["cpu_capability"] != "AVX2" for r in rows):
        print(f"[demo] WARNING: this CPU has no AVX2 (torch ran {rows[0]['cpu_capability']} "
              f"kernels): the numbers differ from README's", flush=True)
    summary = summarize(rows)
    tables = markdown(summary, seeds) + "\n" + conditions(rows, args.isa, args.threads, drift) \
        + "\n"
    wall = time.time() - start
    print(f"\n{tables}\n[demo] total wall time {wall:.0f} s "
          f"({sum(r['cpu_seconds'] for r in rows):.0f} CPU-s in the runs); tables in "
          f"{root}/results.md", flush=True)
    from plugins.atomic_io import save_text
    save_text(os.path.join(root, "results.md"), tables)
    save_text(os.path.join(root, "results.json"), json.dumps(
        {"command": " ".join(["python -m tools.demo"] + list(argv if argv is not None
                                                               else sys.argv[1:])),
         "lock_differences": drift, "isa": args.isa, "pins": ISA_PINS[args.isa],
         "seeds": seeds, "jobs": args.jobs, "threads": args.threads,
         "wall_seconds": round(wall, 1), "runs": rows, "summary": summary}, indent=1))
    return rows


if __name__ == "__main__":
    main()
