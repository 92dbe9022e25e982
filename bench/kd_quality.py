"""What each distillation method buys: a CPU-scale synthetic face task with a teacher - student
gap, every method trained with several seeds, evaluated on identities unseen in training.

    python bench/kd_quality.py --regime converged    # converged networks (make kd-bench-converged)
    python bench/kd_quality.py                       # = --regime short (make kd-bench)
    python bench/kd_quality.py --quick               # short, 1 seed, smaller data (make kd-bench-quick)
    python bench/kd_quality.py --regime large --device cuda   # iresnet50 -> MobileFaceNet, a GPU

The regimes (tools/kd_bench.py ``REGIMES``): ``short`` is the CPU demo's (the demo's teacher
``tiny_t`` for 4 epochs, a much smaller student ``kdb_student`` for 3, one shared cosine: what a
teacher signal buys on a short schedule); ``converged`` trains the teacher until it stops
improving and every student until the student alone has converged, every run on the shape of
GKD's recipe (warm-up + one cosine) scaled to the regime's epochs, on a task where the
capacity gap survives convergence (patch-stem networks ``kdb_patch_teacher`` and
``kdb_patch_student``, tools/kd_bench_nets.py, 48 epochs each; within-identity variation 1.25;
``--schedule papers``: each method on its own paper's shape, with a student alone per recipe);
``large`` is the same design at GPU scale.  The teacher is
trained once, with its teacher-embedding cache (plus, for the convergence evidence, the same
teacher for fewer epochs), and cached by the digest of its config, data, code and package versions
(``work_dirs/kd_bench/teacher_<digest>/``); every method of ``tools.kd_bench.method_table`` is
then trained for every seed through engine.trainer.train and evaluated with the IJB-C pipeline
(TAR@FAR 1e-4 / 1e-3 / 1e-2 on a synthetic IJB-C folder) and the 10-fold accuracy on a synthetic
lfw.bin.  Runs are also cached by digest (config, data, code: ``kd_bench.CODE_PATHS``, package
versions, device; ``--fresh`` retrains them).  The report starts with the regime's checks: the
teacher stopped improving, the student alone converged, the capacity gap.

Determinism: every job is a process with one intra-op thread, no DataLoader workers and the AVX2
kernels (``--isa``, tools/cpu_isa.py; on a CPU), seeded from its config, so the same command with
the locked packages prints the same numbers, whatever ``--jobs`` is (jobs only run side by side).

Writes ``<out>/results.json``, ``results.md`` and ``kd_quality.png`` (default out:
``work_dirs/kd_bench/<regime>``, ``.../quick`` for ``--quick``).
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
from tools.cpu_isa import ISA_PINS, pinned_environment  # noqa: E402
from tools.kd_bench import (BASELINE, aggregate, cached_result, checks_table,  # noqa: E402
                           config_digest, convergence_checks, job_folder, markdown_tables,
                           merged_task, methods_of, plot_summary, student_config,
                           teacher_config)
from tools.kd_bench_jobs import make_data, train_and_eval, train_teacher  # noqa: E402

CODE = kd_bench.code_digest(REPO)     # runs made by other code are not reused
DEFAULT_ROOT = os.path.join(REPO, "work_dirs", "kd_bench")


def slug(name: str) -> str:
    """File-name form of a method name: ``AdaArcDistill alpha'`` -> ``adaarcdistill_alpha_p``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower().replace("'", "_p")).strip("_")


def data_digest_of(task: Dict[str, Any], env: Dict[str, Any]) -> str:
    """The data folder's digest: its sizes and seeds, the code that writes and reads it (the
    aligned IJB images are kept in it) and the package versions (the JPEG codecs)."""
    return config_digest({"data": task["data"], "code": CODE, "env": env})


def teacher_job(task: Dict[str, Any], data_root: str, data_digest: str, root: str,
                device: str = "cpu", epochs: Optional[int] = None) -> Dict[str, Any]:
    """The teacher's job: its config, digest and folder.  ``epochs`` (a convergence reference:
    the same teacher for other epochs, no embedding cache) replaces the regime's."""
    reference = epochs is not None and int(epochs) != int(task["teacher"]["num_epoch"])
    config = teacher_config(task, epochs)
    digest = config_digest({"data": data_digest, "config": config, "code": CODE,
                            "device": device, "cache": not reference})
    output = job_folder(root, "teacher", digest)
    config.update(rec=data_root, num_classes=task["data"]["num_ids"],
                  num_image=task["data"]["num_ids"] * task["data"]["images_per_id"],
                  output=output)
    return {"name": f"teacher, {config['num_epoch']} epochs" if reference else "teacher",
            "config": config, "digest": digest, "data_root": data_root, "repo": REPO,
            "output": output, "device": device, "build_cache": not reference,
            "epochs": int(config["num_epoch"])}


def student_jobs(task: Dict[str, Any], methods: Sequence[kd_bench.Method], data_root: str,
                 data_digest: str, teacher: Dict[str, Any], root: str, device: str = "cpu"
                 ) -> List[Dict[str, Any]]:
    """One job per (method, seed), ordered seed-major so that partial results pair up."""
    jobs = []
    for seed in task["seeds"]:
        for method in methods:
            config = student_config(task, method)
            config["seed"] = int(seed)
            distill = config["distill"]
            identity = {"data": data_digest, "config": config, "code": CODE, "device": device,
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
                         "device": device, "needs_teacher": distill != "none"})
    return jobs


def machine(device: str = "cpu") -> Dict[str, Any]:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "processor": platform.processor(), "device": device}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
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


def select_methods(methods: Sequence[kd_bench.Method], names: str) -> List[kd_bench.Method]:
    """The rows named in the comma-separated ``names`` (all when empty; a comma followed by a
    space belongs to a name, as in ``student alone, 2x epochs``), with the baseline of
    each (and the short regime's ``student alone``) always kept; SystemExit naming an unknown
    one."""
    if not names:
        return list(methods)
    wanted = {m.strip() for m in re.split(r",(?! )", names)}   # "a, b" inside a name stays
    try:
        return kd_bench.rows_named(methods, wanted | {BASELINE}, "--methods")
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def run(args: argparse.Namespace) -> Dict[str, Any]:
    start = time.time()
    try:
        task = merged_task(args.quick, args.regime, args.schedule or None)
    except ValueError as exc:
        raise SystemExit(str(exc))
    device = args.device or task["device"]
    if args.seeds:
        task["seeds"] = [int(s) for s in args.seeds.split(",")]
    root = os.path.abspath(args.root)
    methods = select_methods(methods_of(task, every=bool(args.methods)), args.methods)
    out = args.out or os.path.join(root, "quick" if args.quick else task["regime"])

    env = dict(kd_bench.environment(), isa=args.isa if device == "cpu" else "device")
    data_digest = data_digest_of(task, env)
    data_root = job_folder(root, "data", data_digest)
    print(f"[kd-bench] regime {task['regime']} on {device}; data {data_root}", flush=True)
    make_data(dict(task["data"], render_workers=args.jobs), data_root)

    teacher = teacher_job(task, data_root, data_digest, root, device)
    references = [teacher_job(task, data_root, data_digest, root, device, epochs)
                  for epochs in task["teacher_reference_epochs"]]
    jobs = student_jobs(task, methods, data_root, data_digest, teacher, root, device)
    results: List[Dict[str, Any]] = []
    teacher_result = None if args.fresh_teacher else \
        cached_result(teacher["output"], "teacher.json", teacher["digest"])
    curve: List[Dict[str, Any]] = []
    pending_references = []
    for ref in references:
        cached = None if args.fresh_teacher else \
            cached_result(ref["output"], "teacher.json", ref["digest"])
        if cached is not None:
            curve.append(cached)
        else:
            pending_references.append(ref)
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
          f"({teacher['output']}); {len(results)} runs cached, {len(pending)} to run, "
          f"{len(pending_references)} reference teacher(s) to train, with {args.jobs} parallel "
          f"job(s)", flush=True)

    if args.report_only:
        if teacher_result is None:
            raise SystemExit(f"--report-only: no finished teacher in {teacher['output']}")
        missing = [job["name"] for job in pending] + [r["name"] for r in pending_references]
        if missing:
            print(f"[kd-bench] --report-only: {len(missing)} runs not finished, left out: "
                  f"{missing}", flush=True)
        pending, pending_references = [], []
    pins = ISA_PINS[args.isa] if device == "cpu" else {}
    with pinned_environment(pins), _executor(args.jobs) as pool:
        # the teacher first (the distilled runs wait for it), then the reference teachers (the
        # longest jobs: started early, they do not leave a core idle at the end), then what does
        # not need the teacher; the distilled runs queue behind them
        futures: Dict[concurrent.futures.Future, Dict[str, Any]] = {}
        if teacher_result is None:
            teacher_future = pool.submit(train_teacher, teacher)
        for ref in pending_references:
            futures[pool.submit(train_teacher, ref)] = ref
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
            if "method" in futures[future]:
                results.append(result)
            else:
                curve.append(result)
            print(f"[kd-bench] {result['name']}: " + ", ".join(
                f"{k} {v:.2f}" for k, v in result["metrics"].items()
                if k in kd_bench.METRICS) + f" ({result['seconds']:.0f} s)", flush=True)

    order = [m.name for m in methods]
    results.sort(key=lambda r: (order.index(r["method"]), r["seed"]))
    summary = aggregate(results, teacher_result["metrics"], order,
                        baselines={m.name: m.baseline for m in methods})
    curve = [{"epochs": r["epochs"], "metrics": r["metrics"]} for r in curve] + \
        [{"epochs": teacher["epochs"], "metrics": teacher_result["metrics"]}]
    checks = convergence_checks(summary, curve, {m.name: m.doubles for m in methods
                                                 if m.doubles and m.doubles in order},
                                **task["checks"])
    verdicts = kd_bench.claim_verdicts(summary)
    tables = "\n".join(checks_table(checks) + [""] + kd_bench.claims_table(verdicts)) + \
        "\n\n" + markdown_tables(summary)
    wall = time.time() - start
    payload = {"command": " ".join(["python", "bench/kd_quality.py"] + args.argv),
               "regime": task["regime"], "device": device, "task": task,
               "methods": [{"name": m.name, "config": dict(m.config), "recipe": m.recipe,
                            "baseline": m.baseline, "run_config": student_config(task, m)}
                           for m in methods],
               "teacher": teacher_result, "teacher_curve": curve, "checks": checks,
               "claims": verdicts,
               "runs": results, "summary": summary, "environment": env,
               "machine": machine(device), "jobs": args.jobs, "wall_seconds": round(wall, 1),
               "report_only": bool(args.report_only),
               "train_seconds_total": round(sum(r["seconds"] for r in results), 1)}
    os.makedirs(out, exist_ok=True)
    from plugins.atomic_io import save_text
    save_text(os.path.join(out, "results.json"), json.dumps(payload, indent=1))
    save_text(os.path.join(out, "results.md"), tables)
    plot_summary(summary, os.path.join(out, "kd_quality.png"))
    print("\n" + tables)
    gaps = "; ".join(f"teacher - {g['baseline']}: {g['gap']:.2f}" for g in checks["gaps"]) or \
        "no baseline row"
    print(f"[kd-bench] gap at TAR@FAR=1e-3: {gaps} points; wall time {wall:.0f} s; written to "
          f"{out}/", flush=True)
    return payload


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", default="short", choices=sorted(kd_bench.REGIMES),
                        help="short: the demo's schedule (default); converged: teacher and "
                             "students trained to convergence; large: GPU scale")
    parser.add_argument("--device", default="", choices=("", "cpu", "cuda"),
                        help="where the runs train and evaluate (default: the regime's, cpu for "
                             "short and converged, cuda for large)")
    parser.add_argument("--schedule", default="", choices=("",) + kd_bench.SCHEDULES,
                        help="the schedule shape of every run (default: the regime's -- the "
                             "demo's cosine for short, GKD's for converged and large); 'papers': "
                             "each method on its own paper's shape, one student alone per recipe")
    parser.add_argument("--quick", action="store_true",
                        help="the short regime with 1 seed and smaller data (~3 min)")
    parser.add_argument("--isa", choices=sorted(ISA_PINS), default="avx2",
                        help="the CPU kernels' instruction set (tools/cpu_isa.py): avx2 "
                             "(default) gives the same numbers on AVX2 and AVX-512 machines; "
                             "native lets each library choose (part of every digest)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs side by side, one thread each (results do not depend on it)")
    parser.add_argument("--seeds", default="", help="comma-separated seeds (default: the task's)")
    parser.add_argument("--methods", default="",
                        help="comma-separated method names (their baselines are always run)")
    parser.add_argument("--root", default=DEFAULT_ROOT,
                        help="cache folder: data, teacher, runs (default <repo>/work_dirs/kd_bench)")
    parser.add_argument("--out", default="",
                        help="report folder (default <root>/<regime>, <root>/quick for --quick)")
    parser.add_argument("--fresh", action="store_true", help="retrain cached student runs")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: the table of the finished (cached) runs")
    parser.add_argument("--fresh-teacher", action="store_true",
                        help="retrain the teacher (and its references) even if cached")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if args.quick and args.regime != "short":
        parser.error(f"--quick is a smoke test of the short regime, not of --regime {args.regime}")
    return run(args)


if __name__ == "__main__":
    main()
