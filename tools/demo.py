"""The CPU demo behind `make demo`: synthetic faces -> a teacher -> students trained alone, with
AdaDistill and with GKD -> a verification table comparing them.

    python -m tools.demo [--quick]

Everything lands in work_dirs/demo/ (data, one folder per run, results.json).  The four runs use
the job configs configs/demo_{teacher,student,adadistill,gkd}.py; --quick shrinks them for tests.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List, Optional, Sequence

from prettytable import PrettyTable

from engine.config import get_config
from tools.synthetic import write_train_set, write_verification_bin

RUNS = (("teacher", "demo_teacher"), ("student alone", "demo_student"),
        ("AdaDistill", "demo_adadistill"), ("GKD", "demo_gkd"))


def make_data(cfg, images_per_id: int, pairs: int) -> None:
    """Write the demo's training set and lfw.bin (identities disjoint from training) once."""
    marker = os.path.join(cfg.rec, f"demo_{cfg.num_classes}x{images_per_id}_{pairs}.done")
    if os.path.isfile(marker):
        print(f"[demo] synthetic data already in {cfg.rec}")
        return
    print(f"[demo] writing {cfg.num_classes} identities x {images_per_id} images to {cfg.rec}")
    write_train_set(cfg.rec, cfg.num_classes, images_per_id, seed=0, verbose=True)
    write_verification_bin(os.path.join(cfg.rec, "lfw.bin"), pairs, seed=0, num_ids=100,
                           verbose=True)
    open(marker, "w").close()


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--output", default=None, help="work folder (default work_dirs/demo)")
    args = parser.parse_args(argv)
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
    make_data(configs[0][1], images_per_id, 40 if args.quick else 600)

    rows = []
    for label, cfg in configs:
        print(f"\n[demo] training {label}: {cfg.network}, distill={cfg.distill}, "
              f"output {cfg.output}")
        t0 = time.time()
        cfg.start_over = True          # the demo retrains from scratch each time it runs
        summary = train(cfg)
        accuracy, std, _ = summary["verification"]["lfw"]
        rows.append({"run": label, "network": cfg.network, "distill": cfg.distill,
                     "lfw_accuracy": accuracy, "lfw_std": std, "loss": summary["loss"],
                     "steps": summary["steps"], "seconds": round(time.time() - t0, 1)})
    table = PrettyTable(["run", "network", "distill", "synthetic LFW acc (%)", "steps", "time (s)"])
    for row in rows:
        table.add_row([row["run"], row["network"], row["distill"],
                       f"{row['lfw_accuracy']:.2f} +- {row['lfw_std']:.2f}", row["steps"],
                       row["seconds"]])
    print(f"\n{table}\n[demo] total wall time {time.time() - start:.0f} s")
    out = os.path.dirname(configs[0][1].output)
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump(rows, handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
