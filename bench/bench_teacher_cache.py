"""What the teacher-embedding cache saves: one training step with the online teacher, with the
cache, and of the student alone, measured side by side in one run (CPU), plus the projected cost of
a whole run including the one-off cache build.

    python bench/bench_teacher_cache.py [--batch-size 32] [--rounds 3] [--num-classes 85742]

Variants, (a)-(c) each a full optimizer step on the same batch:
  (a) online:  r50 teacher forward (frozen) + MobileFaceNet forward/backward + AdaDistill head
  (b) cached:  teacher-embedding cache lookup + the same student step and AdaDistill head
  (c) alone:   the student with the standalone margin head (ArcFace, learned weights)
  (d) build:   ``build_teacher_cache`` of the batch's images into a fresh folder (decode, both
               views, casts, memmap write, chunk marker, meta)
  (e) forward: the teacher forward of the batch and its mirror, nothing else (the build's floor)
  (f) hook:    the online teacher step, ``TeacherHook.teacher_embeddings`` (inference_mode,
               shape check, copy out of inference mode)
  (g) official: the official loop's teacher step, ``torch.no_grad()`` + the eval-mode backbone
The variants are interleaved round by round (a, b, c, then c, b, a, ...) so that machine load
affects them alike; the median per variant is reported, and every round's times.  The projection for ``--epochs`` epochs counts the
cache build (two teacher forwards per image, once) at its measured cost per image.  Last, the
cache build throughput of the same teacher exported to ONNX and run by onnxruntime
(``teacher_network = "onnx"``) beside the torch one (``--onnx-rounds``, 0 skips it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.dataset import FaceRecordDataset  # noqa: E402
from tools.synthetic import write_train_set  # noqa: E402
from engine.teacher_cache_build import build_teacher_cache  # noqa: E402
from plugins.heads import AdaDistillHead  # noqa: E402
from plugins.backbones import resolve_model  # noqa: E402
from plugins.heads import MarginSoftmaxHead  # noqa: E402
from plugins.teacher import TeacherHook  # noqa: E402
from plugins.teacher_cache import TeacherEmbeddingCache, cache_identity  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32, help="images per step")
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per variant")
    parser.add_argument("--num-classes", type=int, default=85742,
                        help="head classes (MS1MV2: 85,742; per rank = global batch x C / W)")
    parser.add_argument("--epochs", type=int, default=26, help="epochs of the projected run")
    parser.add_argument("--teacher", default="r50")
    parser.add_argument("--student", default="mobilefacenet")
    parser.add_argument("--onnx-rounds", type=int, default=2,
                        help="cache builds per teacher for the ONNX-teacher comparison (0: skip)")
    return parser.parse_args()


def timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    batch = args.batch_size
    work = tempfile.mkdtemp(prefix="bench_teacher_cache_")
    data = os.path.join(work, "data")
    write_train_set(data, num_ids=max(1, batch // 4), images_per_id=4, seed=0)
    flipping = FaceRecordDataset(data, flip=True, seed=0)
    items = [flipping[i] for i in range(batch)]
    images = torch.stack([it[0] for it in items])
    labels = torch.stack([it[1] for it in items]).long()
    index = torch.tensor([it[2] for it in items])
    flipped = torch.tensor([it[3] for it in items])

    teacher = TeacherHook(resolve_model(args.teacher))  # random weights: the cost is the same
    plain = FaceRecordDataset(data, flip=False)
    cache_dir = os.path.join(work, "cache")
    meta = cache_identity(teacher.digest, args.teacher, data, len(plain), 512)
    # float32: an untrained r50's embeddings overflow float16 (the lookup cost barely differs)
    builds = [0]

    def build_once() -> None:
        """The whole cache build of the batch's images (fresh folder each time)."""
        builds[0] += 1
        build_teacher_cache(teacher, plain, os.path.join(work, f"cache{builds[0]}"), meta,
                            batch_size=batch, num_workers=0, dtype="float32", progress=False)

    def forward_both_views() -> None:
        """The pure teacher forward the build cannot avoid: the images and their mirrors."""
        teacher(torch.cat([images, torch.flip(images, dims=[3])]))

    def official_teacher_step() -> None:
        """The official AdaDistill loop's teacher step: the eval-mode backbone under no_grad."""
        with torch.no_grad():
            teacher.model(images)

    build_teacher_cache(teacher, plain, cache_dir, meta, batch_size=batch, num_workers=0,
                        dtype="float32", progress=False)
    cache = TeacherEmbeddingCache(cache_dir, expect=meta)

    def distill_model():
        torch.manual_seed(1)
        student = resolve_model(args.student)
        head = AdaDistillHead(512, args.num_classes, margin="arcface", s=64.0, m=0.45)
        return student, head, torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)

    online_student, online_head, online_opt = distill_model()
    cached_student, cached_head, cached_opt = distill_model()
    torch.manual_seed(1)
    alone_student = resolve_model(args.student)
    alone_head = MarginSoftmaxHead(512, args.num_classes, margin="arcface", s=64.0, m=0.5)
    alone_opt = torch.optim.SGD(list(alone_student.parameters()) + list(alone_head.parameters()),
                                lr=0.1, momentum=0.9)

    def distill_step(student, head, opt, source) -> None:
        f_t = source.teacher_embeddings(images, index, flipped)
        loss = head(student(images), labels, f_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
        opt.step()

    def alone_step() -> None:
        loss = alone_head(alone_student(images), labels)
        alone_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(alone_student.parameters(), 5.0)
        alone_opt.step()

    variants: Dict[str, Callable[[], None]] = {
        "(a) online teacher + student + AdaDistill": lambda: distill_step(
            online_student, online_head, online_opt, teacher),
        "(b) cached teacher + student + AdaDistill": lambda: distill_step(
            cached_student, cached_head, cached_opt, cache),
        "(c) student alone + margin head": alone_step,
        "(d) cache build of the batch's images": build_once,
        "(e) teacher forward of both views": forward_both_views,
        "(f) online hook: TeacherHook(images)": lambda: teacher.teacher_embeddings(
            images, index, flipped),
        "(g) official loop: no_grad model(images)": official_teacher_step,
    }
    times: Dict[str, List[float]] = {name: [] for name in variants}
    for name, step in variants.items():  # warm-up
        step()
    order = list(variants)
    for round_ in range(args.rounds):  # a, b, c, then c, b, a, ...: no variant always follows
        for name in (order if round_ % 2 == 0 else order[::-1]):  # the teacher
            times[name].append(timed(variants[name]))
    median = {name: statistics.median(t) for name, t in times.items()}
    alone = median["(c) student alone + margin head"]

    print(f"teacher {args.teacher}, student {args.student}, batch {batch}, "
          f"{args.num_classes} classes, CPU threads {torch.get_num_threads()}, "
          f"{args.rounds} rounds (median)")
    for name, seconds in median.items():
        best = min(times[name]) / min(times["(c) student alone + margin head"])
        rounds = " ".join(f"{t:.2f}" for t in times[name])
        print(f"  {name:44s} {seconds * 1000:9.1f} ms/step   x{seconds / alone:5.2f} of (c)"
              f"   (best-of ratio x{best:.2f}; rounds, s: {rounds})")
    build_per_image = median["(d) cache build of the batch's images"] / len(plain)
    forward_per_image = median["(e) teacher forward of both views"] / batch
    best_build = min(times["(d) cache build of the batch's images"]) / len(plain)
    best_forward = min(times["(e) teacher forward of both views"]) / batch
    print(f"  cache build throughput / pure teacher forward of both views: "
          f"x{forward_per_image / build_per_image:.2f} (median), x{best_forward / best_build:.2f} "
          f"(min)   ({len(plain)} images built per round, {batch} images forwarded)")
    hook, official = (times["(f) online hook: TeacherHook(images)"],
                      times["(g) official loop: no_grad model(images)"])
    print(f"  online teacher hook / official loop's teacher step: "
          f"x{statistics.median(hook) / statistics.median(official):.3f} (median), "
          f"x{min(hook) / min(official):.3f} (min)")
    per_image = {name: seconds / batch for name, seconds in median.items()}
    run_alone = args.epochs * per_image["(c) student alone + margin head"]
    run_online = args.epochs * per_image["(a) online teacher + student + AdaDistill"]
    run_cached = (args.epochs * per_image["(b) cached teacher + student + AdaDistill"]
                  + build_per_image)
    print(f"projected {args.epochs}-epoch run, as a multiple of training the student alone "
          f"(medians of this run):")
    print(f"  online teacher            x{run_online / run_alone:5.2f}")
    print(f"  cache build + cached run  x{run_cached / run_alone:5.2f}"
          f"   (build alone: x{build_per_image / run_alone:.2f})")
    if args.onnx_rounds > 0:
        onnx_build_throughput(args, data, work)


def onnx_build_throughput(args: argparse.Namespace, data: str, work: str) -> None:
    """Cache build throughput of the teacher exported to ONNX and run by onnxruntime
    (``teacher_network = "onnx"``) beside the same teacher in torch, builds interleaved
    (torch, onnx, then onnx, torch, ...), median per teacher; plus the largest
    ``|cos - 1|`` between the two caches' embeddings."""
    import numpy as np

    from eval.onnx_export import export_onnx
    from plugins.onnx_teacher import OnnxTeacher

    torch.manual_seed(2)
    model = resolve_model(args.teacher).eval()
    teachers = {"torch": TeacherHook(model)}
    path = export_onnx(model, os.path.join(work, f"{args.teacher}.onnx"))
    teachers["onnx"] = OnnxTeacher(path, embedding_size=512)
    plain = FaceRecordDataset(data, flip=False)
    times: Dict[str, List[float]] = {name: [] for name in teachers}
    folders: Dict[str, str] = {}
    for round_ in range(args.onnx_rounds):
        for name in (list(teachers) if round_ % 2 == 0 else list(teachers)[::-1]):
            folder = os.path.join(work, f"cache_{name}_{round_}")
            meta = cache_identity(teachers[name].digest, name, data, len(plain), 512)
            times[name].append(timed(lambda: build_teacher_cache(
                teachers[name], plain, folder, meta, batch_size=args.batch_size, num_workers=0,
                dtype="float32", progress=False)))
            folders[name] = folder
    tables = {name: torch.from_numpy(np.load(os.path.join(folder, "embeddings.npy")))
              for name, folder in folders.items()}
    cos = torch.nn.functional.cosine_similarity(tables["onnx"].double(),
                                                tables["torch"].double(), dim=-1)
    rate = {name: len(plain) / statistics.median(t) for name, t in times.items()}
    print(f"cache build, {args.teacher} teacher as torch vs as ONNX (onnxruntime "
          f"{teachers['onnx'].providers[0]}), {len(plain)} images x 2 views, "
          f"{args.onnx_rounds} interleaved builds each (median):")
    for name in teachers:
        rounds = " ".join(f"{t:.2f}" for t in times[name])
        print(f"  {name:6s} {rate[name]:8.1f} images/s   (builds, s: {rounds})")
    print(f"  onnx / torch build throughput x{rate['onnx'] / rate['torch']:.2f}; "
          f"max |cos - 1| between the caches {float((cos - 1).abs().max()):.1e}")


if __name__ == "__main__":
    main()
