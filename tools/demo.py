"""The CPU demo behind `make demo`: synthetic faces -> a teacher -> students trained alone, with
AdaDistill and with GKD -> a table comparing them on synthetic LFW (10-fold accuracy) and on a
synthetic IJB-C folder (TAR@FAR 1e-4 / 1e-3 / 1e-2), identities unseen in training.

    python -m tools.demo [--quick] [--threads 1]

Everything lands in work_dirs/demo/ (data, one folder per run, results.json).  The four runs use
the job configs configs/demo_{teacher,student,adadistill,gkd}.py; --quick shrinks them for tests.

Determinism: the printed metrics are the same on every run of the same command on the same
machine and software (torch build, OpenCV's JPEG encoder).  What that needs, and what the demo
pins: one intra-op thread (``--threads``, default 1; torch reduces in another order with another
thread count, and by default the trainer takes ``cores - workers`` threads, so a 2-core and an
8-core machine used to print different numbers), the seeds of the configs (weights, sampling,
flips) and the synthetic data's generator seed.  DataLoader workers only decode, so their number
does not change the numbers.  Timings are printed but are not part of that promise.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List, Optional, Sequence

from prettytable import PrettyTable

from engine.config import get_config
from tools.synthetic import write_ijb, write_train_set, write_verification_bin

RUNS = (("teacher", "demo_teacher"), ("student alone", "demo_student"),
        ("AdaDistill", "demo_adadistill"), ("GKD", "demo_gkd"))
FARS = (1e-4, 1e-3, 1e-2)
IJB_FULL = {"num_ids": 100, "templates_per_id": 4, "medias_per_template": 2,
            "images_per_media": 1, "impostor_ratio": 100}
IJB_QUICK = {"num_ids": 6, "templates_per_id": 2, "medias_per_template": 1,
             "images_per_media": 1, "impostor_ratio": 10}


def make_data(cfg, images_per_id: int, pairs: int, ijb: Dict[str, int]) -> None:
    """Write the demo's training set, lfw.bin and IJBC/ (identities disjoint from training)
    once."""
    marker = os.path.join(cfg.rec, f"demo_{cfg.num_classes}x{images_per_id}_{pairs}_ijb"
                                   f"{ijb['num_ids']}x{ijb['templates_per_id']}.done")
    if os.path.isfile(marker):
        print(f"[demo] synthetic data already in {cfg.rec}")
        return
    print(f"[demo] writing {cfg.num_classes} identities x {images_per_id} images to {cfg.rec}")
    write_train_set(cfg.rec, cfg.num_classes, images_per_id, seed=0, verbose=True)
    write_verification_bin(os.path.join(cfg.rec, "lfw.bin"), pairs, seed=0, num_ids=100,
                           verbose=True)
    write_ijb(os.path.join(cfg.rec, "IJBC"), "IJBC", seed=0, verbose=True, **ijb)
    open(marker, "w").close()


def pin_threads(threads: int) -> None:
    """Fix the intra-op thread count of this process (and of the trainer, which keeps an
    OMP_NUM_THREADS it finds set)."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--output", default=None, help="work folder (default work_dirs/demo)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (the numbers depend on it; README's use 1)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    pin_threads(args.threads)
    from tools.kd_bench_jobs import ijb_tar_at_far, load_trained
    from eval.ijb import far_key
    from engine.trainer import train

    start = time.time()
    configs = [(label, get_config(f"configs/{name}")) for label, name in RUNS]
    if args.quick or args.output:
        root = args.output or "work_dirs/demo_quick"
        for _, cfg in configs:
            cfg.output = cfg.output.replace("work_dirs/demo", root)
            cfg.rec = cfg.rec.replace("work_dirs/demo", root)
            for key in ("teacher_checkpoint", "teacher_classifier"):
                if cfg.get(key):
                    cfg[key] = cfg[key].replace("work_dirs/demo", root)
            if args.quick:
                cfg.num_classes, cfg.num_image, cfg.max_steps, cfg.batch_size = 20, 200, 4, 16
                cfg.num_workers, cfg.gkd_k = 0, 5
    images_per_id = configs[0][1].num_image // configs[0][1].num_classes
    make_data(configs[0][1], images_per_id, 40 if args.quick else 600,
              IJB_QUICK if args.quick else IJB_FULL)
    ijb_root = os.path.join(configs[0][1].rec, "IJBC")

    rows = []
    for label, cfg in configs:
        print(f"\n[demo] training {label}: {cfg.network}, distill={cfg.distill}, "
              f"output {cfg.output}")
        t0 = time.time()
        cfg.start_over = True          # the demo retrains from scratch each time it runs
        summary = train(cfg)
        accuracy, std, _ = summary["verification"]["lfw"]
        ijb = ijb_tar_at_far(load_trained(cfg.network, cfg.embedding_size, cfg.output),
                             ijb_root, "IJBC", FARS)
        rows.append({"run": label, "network": cfg.network, "distill": cfg.distill,
                     "lfw_accuracy": accuracy, "lfw_std": std,
                     **{f"tar_at_far_{far_key(f)}": ijb[f"tar@{far_key(f)}"] for f in FARS},
                     "loss": summary["loss"], "steps": summary["steps"],
                     "seconds": round(time.time() - t0, 1)})
    table = PrettyTable(["run", "network", "distill", "synthetic LFW acc (%)"]
                        + [f"IJB-C TAR@FAR={f:.0e} (%)" for f in FARS] + ["steps", "time (s)"])
    for row in rows:
        table.add_row([row["run"], row["network"], row["distill"],
                       f"{row['lfw_accuracy']:.2f} +- {row['lfw_std']:.2f}"]
                      + [f"{row[f'tar_at_far_{far_key(f)}']:.2f}" for f in FARS]
                      + [row["steps"], row["seconds"]])
    print(f"\n{table}\n[demo] {args.threads} intra-op thread(s); total wall time "
          f"{time.time() - start:.0f} s")
    out = os.path.dirname(configs[0][1].output)
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump(rows, handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
