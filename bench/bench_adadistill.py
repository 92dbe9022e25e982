"""Step time of AdaDistill vs the standalone margin head, and head state memory per rank.

One process, CPU.  A training step = student forward + head forward + backward + SGD step
(momentum 0.9; the margin head's weight shard is trained, AdaDistill's centers are a buffer).
The two variants run interleaved, step by step, in the same process, so machine noise hits both
alike; the teacher embeddings are random (the teacher's cost is not part of either head).

    python bench/bench_adadistill.py                  # MS1MV2 size: 85,742 classes, B 128, D 512
    python bench/bench_adadistill.py --steps 5 --classes 10000
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from plugins.heads import AdaDistillHead  # noqa: E402
from plugins.distributed import shard_range  # noqa: E402
from plugins.heads import MarginSoftmaxHead  # noqa: E402


def build_student(dim: int) -> tuple[nn.Module, str]:
    try:
        from plugins.backbones import get_model
    except ImportError as err:
        name = f"stand-in MLP (plugins.backbones unavailable: {err})"
    else:
        return get_model("mobilefacenet", num_features=dim), "plugins.backbones mobilefacenet"
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 112 * 112, 1024), nn.PReLU(),
                         nn.Linear(1024, dim)), name


def timed_step(student, head, optimizer, images, teacher, labels, distill: bool) -> float:
    start = time.perf_counter()
    features = student(images)
    loss = head(features, labels, teacher) if distill else head(features, labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def head_only_step(head, features, teacher, labels, distill: bool) -> float:
    x = features.clone().requires_grad_(True)
    start = time.perf_counter()
    loss = head(x, labels, teacher) if distill else head(x, labels)
    loss.backward()
    return time.perf_counter() - start


def mib(num_bytes: int) -> str:
    return f"{num_bytes / 2 ** 20:9.2f} MiB"


def memory_table(num_classes: int, dim: int) -> None:
    full = num_classes * dim * 4
    print(f"\nhead state per rank (fp32, largest shard = rank 0), C={num_classes}, D={dim}")
    print(f"  official AdaDistill head: full table as nn.Parameter on every rank: {mib(full)} "
          f"+ its (unused) gradient {mib(full)} = {mib(2 * full)}")
    for world in (1, 8, 64):
        rows = shard_range(num_classes, 0, world)[1]
        ours = rows * dim * 4
        margin = 3 * ours  # weight + gradient + SGD momentum buffer
        print(f"  W={world:3d}: AdaDistillHead centers {mib(ours)} = {ours:>11,d} B | full table "
              f"{full:,d} B | ratio full/ours {full / ours:6.1f}x (vs official param+grad "
              f"{2 * full / ours:6.1f}x) | MarginSoftmaxHead weight+grad+momentum {mib(margin)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=85742)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()

    torch.manual_seed(0)
    student, student_name = build_student(args.dim)
    student.train()
    print(f"student: {student_name}, {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M "
          f"params; C={args.classes} B={args.batch} D={args.dim}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    ada = AdaDistillHead(args.dim, args.classes, margin="arcface", s=64.0, m=0.45)
    margin = MarginSoftmaxHead(args.dim, args.classes, margin="arcface", s=64.0, m=0.5)
    opt_ada = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    opt_margin = torch.optim.SGD([{"params": student.parameters()},
                                  {"params": margin.parameters()}],
                                 lr=0.01, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(args.batch, 3, 112, 112)
    teacher = torch.randn(args.batch, args.dim)
    labels = torch.randint(0, args.classes, (args.batch,))

    times = {"ada": [], "margin": [], "ada_head": [], "margin_head": []}
    features = torch.randn(args.batch, args.dim)
    for step in range(args.warmup + args.steps):
        t_ada = timed_step(student, ada, opt_ada, images, teacher, labels, True)
        t_margin = timed_step(student, margin, opt_margin, images, None, labels, False)
        h_ada = head_only_step(ada, features, teacher, labels, True)
        h_margin = head_only_step(margin, features, None, labels, False)
        margin.weight.grad = None
        tag = "warmup" if step < args.warmup else "step"
        print(f"  {tag} {step}: student+AdaDistillHead {t_ada:7.3f} s | student+MarginSoftmaxHead "
              f"{t_margin:7.3f} s | heads alone: AdaDistill {h_ada:6.3f} s, "
              f"margin {h_margin:6.3f} s")
        if step >= args.warmup:
            for key, value in zip(times, (t_ada, t_margin, h_ada, h_margin)):
                times[key].append(value)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nmedian step: student+AdaDistillHead {med['ada']:.3f} s, student+MarginSoftmaxHead "
          f"{med['margin']:.3f} s, ratio ada/margin {med['ada'] / med['margin']:.3f}")
    print(f"median head alone (fwd+bwd): AdaDistillHead {med['ada_head']:.3f} s, "
          f"MarginSoftmaxHead {med['margin_head']:.3f} s, "
          f"ratio {med['ada_head'] / med['margin_head']:.3f}")
    memory_table(args.classes, args.dim)


if __name__ == "__main__":
    main()
