"""Per-rank memory of GKDHead: a full-size step (MS1MV2: 85,742 classes, global batch 1024) on
W = 1 and W = 8 gloo processes, measured side by side in one run.

For each world size every rank runs one forward + backward of ``GKDHead`` (fixed k = 10,000) and
reports (a) the bytes autograd saved for the backward pass (distinct storages), (b) the rise of its
peak resident memory (Linux VmHWM, reset just before the step) over the memory it held before the
step (weights, inputs), and (c) one logit-sized float32 tensor ``[N, C / W]`` for scale.  Every
world size sees the same global batch and classifiers, so the losses must agree.  Expect the
per-rank figures to scale as 1 / W (plus a fixed ~20 MB of first-call allocations).

    python bench/bench_gkd_memory.py                      # ~2-4 min on 2 CPU cores, ~8 GB RAM
    python bench/bench_gkd_memory.py --classes 8000 --worlds 1 2
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plugins.distributed import shard_range  # noqa: E402
from plugins.heads import GKDHead  # noqa: E402
from tests.distributed_harness import run_distributed  # noqa: E402

MB = 2 ** 20


def _rss_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:   # Linux: "5" resets VmHWM to VmRSS
        f.write("5")


def _step(rank: int, world: int, classes: int, batch: int, dim: int, k: int) -> dict:
    g = torch.Generator().manual_seed(0)   # the same global batch and classifiers for every W
    full_s, full_t = torch.randn(classes, dim, generator=g), torch.randn(classes, dim, generator=g)
    f_s, f_t = torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)
    labels = torch.randint(0, classes, (batch,), generator=g)
    head = GKDHead(dim, classes, full_t, k=k)
    with torch.no_grad():
        head.weight.copy_(full_s[head.class_start:head.class_start + head.num_local])
    rows = slice(rank * batch // world, (rank + 1) * batch // world)
    f_s, f_t, labels = f_s[rows].clone().requires_grad_(True), f_t[rows], labels[rows]
    del full_s, full_t
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    _reset_peak()
    before = _rss_bytes("VmRSS")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = head(f_s, labels, f_t, epoch=10)
    loss.backward()
    peak = _rss_bytes("VmHWM")
    return dict(saved=sum(saved.values()), peak_rise=max(peak - before, 0),
                logit=batch * shard_range(classes, rank, world)[1] * 4, loss=loss.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=85742)
    parser.add_argument("--batch", type=int, default=1024, help="global batch")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10000)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    rows = {}
    for world in args.worlds:
        results = run_distributed(_step, world, (args.classes, args.batch, args.dim, args.k))
        worst = {key: max(r[key] for r in results) for key in ("saved", "peak_rise", "logit")}
        worst["loss"] = results[0]["loss"]
        rows[world] = worst
        print(f"W={world}: per rank (max over ranks) one [N, C/W] fp32 tensor "
              f"{worst['logit'] / MB:8.1f} MB | saved for backward {worst['saved'] / MB:8.1f} MB"
              f" | peak RSS rise in the step {worst['peak_rise'] / MB:8.1f} MB | "
              f"loss {results[0]['loss']:.4f}")
    first, last = args.worlds[0], args.worlds[-1]
    print(f"loss W={last} - loss W={first}: {rows[last]['loss'] - rows[first]['loss']:.2e} "
          f"(same global batch; float32 rounding only)")
    for key in ("saved", "peak_rise"):
        print(f"ratio {key} W={last} / W={first}: "
              f"{rows[last][key] / max(rows[first][key], 1):.3f} (ideal {first / last:.3f})")


if __name__ == "__main__":
    main()
