"""What each distillation method buys: a CPU-scale synthetic face task with a teacher - student
gap, every method trained with several seeds, evaluated on identities unseen in training.

    python bench/kd_quality.py            # the full benchmark (make kd-bench)
    python bench/kd_quality.py --quick    # 1 seed, smaller data (make kd-bench-quick)

The task (tools/kd_bench.py ``TASK``, the CPU demo's regime): a synthetic training set
(tools/synthetic.py), the demo's teacher (``tiny_t``) and a much smaller student
(``kdb_student``, 34x fewer multiply-adds, tools/kd_bench_jobs.py).  The teacher is trained
once, with its teacher-embedding cache, and cached by the digest of its config, data and code
(``work_dirs/kd_bench/teacher_<digest>/``); every method of ``tools.kd_bench.method_table`` is
then trained for every seed with the same data, schedule and steps through
engine.trainer.train, and evaluated with the IJB-C pipeline (TAR@FAR 1e-4 / 1e-3 / 1e-2 on a
synthetic IJB-C folder) and the 10-fold accuracy on a synthetic lfw.bin.  Runs are also cached
by digest (config, data, code: ``kd_bench.CODE_PATHS``; ``--fresh`` retrains them).

Determinism: every job is a process with one intra-op thread and no DataLoader workers, seeded
from its config, so the same command on the same machine prints the same numbers, whatever
``--jobs`` is (jobs only run side by side).

Writes ``<out>/results.json``, ``results.md`` and ``kd_quality.png`` (default out:
``work_dirs/kd_bench/full`` or ``.../quick``).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import re
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.setdefault("OMP_NUM_THREADS", "1")     # inherited by the spawned job processes

from tools import kd_bench  # noqa: E402
from tools.kd_bench import (BASELINE, aggregate, cached_result, config_digest,  # noqa: E402
                           job_folder, markdown_tables, merged_task, method_table, plot_summary)
from tools.kd_bench_jobs import make_data, train_and_eval, train_teacher  # noqa: E402

CODE = kd_bench.code_digest(REPO)     # runs made by other code are not reused


def slug(name: str) -> str:
    """File-name form of a method name: ``AdaArcDistill alpha'`` -> ``adaarcdistill_alpha_p``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower().replace("'", "_p")).strip("_")


def teacher_job(task: Dict[str, Any], data_root: str, data_digest: str, root: str
                ) -> Dict[str, Any]:
    """The teacher's job: its config, digest and folder."""
    config = dict(task["shared"], **task["teacher"])
    digest = config_digest({"data": data_digest, "config": config, "code": CODE})
    output = job_folder(root, "teacher", digest)
    config.update(rec=data_root, num_classes=task["data"]["num_ids"],
                  num_image=task["data"]["num_ids"] * task["data"]["images_per_id"],
                  output=output)
    return {"name": "teacher", "config": config, "digest": digest, "data_root": data_root,
            "repo": REPO, "output": output}


def student_jobs(task: Dict[str, Any], methods: Sequence[kd_bench.Method], data_root: str,
                 data_digest: str, teacher: Dict[str, Any], root: str) -> List[Dict[str, Any]]:
    """One job per (method, seed), ordered seed-major so that partial results pair up."""
    jobs = []
    for seed in task["seeds"]:
        for method in methods:
            config = dict(task["shared"], **task["student"])
            config.update(method.config)
            config["seed"] = int(seed)
            distill = config["distill"]
            identity = {"data": data_digest, "config": config, "code": CODE,
                        "teacher": teacher["digest"] if distill != "none" else None}
            digest = config_digest(identity)
            output = os.path.join(root, "runs", f"{slug(method.name)}_s{seed}_{digest[:12]}")
            config.update(rec=data_root, num_classes=task["data"]["num_ids"],
                          num_image=task["data"]["num_ids"] * task["data"]["images_per_id"],
                          output=output)
            if distill != "none":
                config.update(teacher_checkpoint=os.path.join(teacher["output"], "model.pt"),
                              teacher_cache=os.path.join(teacher["output"], "embedding_cache"))
            if distill in ("arcdistill", "cosdistill", "gkd", "kd", "margin_distillation"):
                config["teacher_classifier"] = os.path.join(teacher["output"], "classifier.pt")
            jobs.append({"name": f"{method.name} seed {seed}", "method": method.name,
                         "seed": int(seed), "config": config, "digest": digest,
                         "data_root": data_root, "repo": REPO, "output": output,
                         "needs_teacher": distill != "none"})
    return jobs


def machine() -> Dict[str, Any]:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "processor": platform.processor()}
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle
                     if line.startswith("model name")]
        if names:
            info["processor"] = names[0]
    except OSError:
        pass
    from data.image_codec import decoder_name
    info["jpeg_decoder"] = decoder_name()
    return info


def _executor(jobs: int) -> concurrent.futures.Executor:
    """Processes started fresh (spawn): each job pins its own threads and imports nothing
    stale from this process."""
    return concurrent.futures.ProcessPoolExecutor(jobs,
                                                  mp_context=multiprocessing.get_context("spawn"))


def run(args: argparse.Namespace) -> Dict[str, Any]:
    start = time.time()
    task = merged_task(args.quick)
    if args.seeds:
        task["seeds"] = [int(s) for s in args.seeds.split(",")]
    root = args.root
    methods = method_table(task["data"]["num_ids"])
    if args.methods:
        wanted = {m.strip() for m in args.methods.split(",")} | {BASELINE}
        unknown = wanted - {m.name for m in methods}
        if unknown:
            raise SystemExit(f"--methods: unknown {sorted(unknown)}; known: "
                             f"{[m.name for m in methods]}")
        methods = [m for m in methods if m.name in wanted]
    out = args.out or os.path.join(root, "quick" if args.quick else "full")

    data_digest = config_digest(task["data"])
    data_root = os.path.abspath(job_folder(root, "data", data_digest))
    print(f"[kd-bench] data {data_root}", flush=True)
    make_data(dict(task["data"], render_workers=args.jobs), data_root)

    teacher = teacher_job(task, data_root, data_digest, os.path.abspath(root))
    jobs = student_jobs(task, methods, data_root, data_digest, teacher, os.path.abspath(root))
    results: List[Dict[str, Any]] = []
    teacher_result = None if args.fresh_teacher else \
        cached_result(teacher["output"], "teacher.json", teacher["digest"])
    pending = []
    for job in jobs:
        cached = None if args.fresh else cached_result(job["output"], "result.json",
                                                        job["digest"])
        if cached is not None:
            results.append(cached)
        else:
            job["reuse"] = not args.fresh      # a worker re-checks the cache unless --fresh
            pending.append(job)
    print(f"[kd-bench] teacher {'cached' if teacher_result else 'to train'} "
          f"({teacher['output']}); {len(results)} runs cached, {len(pending)} to run with "
          f"{args.jobs} parallel job(s)", flush=True)

    if args.report_only:
        if teacher_result is None:
            raise SystemExit(f"--report-only: no finished teacher in {teacher['output']}")
        missing = [job["name"] for job in pending]
        if missing:
            print(f"[kd-bench] --report-only: {len(missing)} runs not finished, left out: "
                  f"{missing}", flush=True)
        pending = []
    with _executor(args.jobs) as pool:
        futures = {}
        if teacher_result is None:
            teacher_future = pool.submit(train_teacher, teacher)
        for job in pending:
            if not job["needs_teacher"] or teacher_result is not None:
                futures[pool.submit(train_and_eval, job)] = job
        if teacher_result is None:
            teacher_result = teacher_future.result()
            print(f"[kd-bench] teacher: {teacher_result['metrics']}", flush=True)
            for job in pending:
                if job["needs_teacher"]:
                    futures[pool.submit(train_and_eval, job)] = job
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            results.append(result)
            print(f"[kd-bench] {result['name']}: " + ", ".join(
                f"{k} {v:.2f}" for k, v in result["metrics"].items()
                if k in kd_bench.METRICS) + f" ({result['seconds']:.0f} s)", flush=True)

    order = [m.name for m in methods]
    results.sort(key=lambda r: (order.index(r["method"]), r["seed"]))
    summary = aggregate(results, teacher_result["metrics"], order)
    tables = markdown_tables(summary)
    wall = time.time() - start
    payload = {"command": " ".join(["python", "bench/kd_quality.py"] + args.argv),
               "task": task, "methods": [{"name": m.name, "config": dict(m.config)}
                                         for m in methods],
               "teacher": teacher_result, "runs": results, "summary": summary,
               "machine": machine(), "jobs": args.jobs, "wall_seconds": round(wall, 1),
               "report_only": bool(args.report_only),
               "train_seconds_total": round(sum(r["seconds"] for r in results), 1)}
    os.makedirs(out, exist_ok=True)
    from plugins.atomic_io import save_text
    save_text(os.path.join(out, "results.json"), json.dumps(payload, indent=1))
    save_text(os.path.join(out, "results.md"), tables)
    plot_summary(summary, os.path.join(out, "kd_quality.png"))
    print("\n" + tables)
    base = next(r for r in summary["rows"] if r["method"] == BASELINE)
    gap = summary["teacher"]["tar@0.001"] - base["metrics"]["tar@0.001"]["mean"]
    print(f"[kd-bench] teacher - student alone gap at TAR@FAR=1e-3: {gap:.2f} points; wall "
          f"time {wall:.0f} s; written to {out}/", flush=True)
    return payload


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, smaller data (~3 min)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs side by side, one thread each (results do not depend on it)")
    parser.add_argument("--seeds", default="", help="comma-separated seeds (default: the task's)")
    parser.add_argument("--methods", default="",
                        help="comma-separated method names (the student alone is always run)")
    parser.add_argument("--root", default=os.path.join("work_dirs", "kd_bench"),
                        help="cache folder: data, teacher, runs")
    parser.add_argument("--out", default="", help="report folder (default <root>/full|quick)")
    parser.add_argument("--fresh", action="store_true", help="retrain cached student runs")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: the table of the finished (cached) runs")
    parser.add_argument("--fresh-teacher", action="store_true",
                        help="retrain the teacher even if cached")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    return run(args)


if __name__ == "__main__":
    main()
