"""What the teacher costs: one training step with the online teacher, with the teacher-embedding
cache, and of the student alone; the cache build against the pure teacher forward it cannot avoid;
the online teacher hook against the official loop's teacher step -- all measured side by side in
one run (CPU), and the projected cost of a whole run including the one-off cache build.

    python bench/bench_teacher_cache.py [--batch-size 32] [--rounds 3] [--num-classes 85742]
                                        [--small-classes 1000] [--onnx-rounds 2]

Variants, (a)-(c) each a full optimizer step on the same batch:
  (a) online:  teacher forward (frozen) + student forward/backward + AdaDistill head
  (b) cached:  teacher-embedding cache lookup + the same student step and AdaDistill head
  (c) alone:   the student with the standalone margin head (ArcFace, learned weights)
  (b') (c')    (b) and (c) with ``--small-classes`` classes (a small head: the teacher's share
               of the run is largest there; 0 skips them)
  (d) build:   ``build_teacher_cache`` of the batch's images into a fresh folder (decode, both
               views, casts, memmap write, chunk marker, meta)
  (e) forward: the teacher forward of the batch and its mirror, nothing else (the build's floor)
  (f) hook:    the online teacher step, ``TeacherHook.teacher_embeddings``
  (g) official: the official loops' teacher step (AdaDistill, GKD): ``torch.no_grad()``, the
               eval-mode backbone, then ``F.normalize`` (our heads normalise inside instead)
  (h) (i)      (f) and (g) with the tiny ``tiny_t`` teacher on 1 image, ``--tiny-calls`` calls
               per timing: the hook's own per-call cost, which a real teacher hides
Every round times each variant once, in the order a, b, c, ... and reversed in the next round, so
that the variants compared ((b)/(c), (d)/(e), (f)/(g), (h)/(i)) run next to each other and
machine load affects them alike.  Every ratio is computed within each round and printed as
min / median over the rounds (and every round's value).  Projection for ``--epochs`` epochs, per
image: ``(build + epochs x cached step) / (epochs x student-alone step)``, data loading left out
(the same for both); its floor replaces the build by the pure forward of both views (e).  Last,
the cache build throughput of the teacher exported to ONNX and run by onnxruntime
(``teacher_network = "onnx"``) beside the torch one (``--onnx-rounds``, 0 skips it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.dataset import FaceRecordDataset  # noqa: E402
from tools.synthetic import write_train_set  # noqa: E402
from engine.teacher_cache_build import build_teacher_cache  # noqa: E402
from plugins.heads import AdaDistillHead  # noqa: E402
from plugins.backbones import resolve_model  # noqa: E402
from plugins.heads import MarginSoftmaxHead  # noqa: E402
from plugins.teacher import TeacherHook  # noqa: E402
from plugins.teacher_cache import TeacherEmbeddingCache, cache_identity  # noqa: E402

ONLINE, CACHED, ALONE = "(a) online teacher + student + AdaDistill", \
    "(b) cached teacher + student + AdaDistill", "(c) student alone + margin head"
CACHED_SMALL, ALONE_SMALL = "(b') cached, small head", "(c') alone, small head"
BUILD, FORWARD = "(d) cache build of the batch's images", "(e) teacher forward of both views"
HOOK, OFFICIAL = "(f) online hook: teacher_embeddings", "(g) official: no_grad + F.normalize"
TINY_HOOK, TINY_OFFICIAL = "(h) hook, tiny_t teacher, 1 image", "(i) official, tiny_t, 1 image"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32, help="images per step")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (>= 3 for a claim)")
    parser.add_argument("--num-classes", type=int, default=85742,
                        help="head classes (MS1MV2: 85,742; with Partial FC on W ranks each rank "
                             "scores W x batch embeddings against C / W classes: the same cost)")
    parser.add_argument("--small-classes", type=int, default=1000,
                        help="classes of the small-head variants (b') (c'); 0 skips them")
    parser.add_argument("--epochs", type=int, default=26, help="epochs of the projected run")
    parser.add_argument("--teacher", default="r50")
    parser.add_argument("--student", default="mobilefacenet")
    parser.add_argument("--tiny-calls", type=int, default=20,
                        help="calls per timing of (h) and (i)")
    parser.add_argument("--onnx-rounds", type=int, default=2,
                        help="cache builds per teacher for the ONNX-teacher comparison (0: skip)")
    return parser.parse_args()


def timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def spread(values: Sequence[float], digits: int = 2) -> str:
    """``"xMIN / xMEDIAN (rounds: ...)"`` of per-round ratios."""
    rounds = " ".join(f"{v:.{digits}f}" for v in values)
    return (f"x{min(values):.{digits}f} min / x{statistics.median(values):.{digits}f} median"
            f"   (rounds: {rounds})")


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

    def official_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
        def step() -> None:
            """The official loops' teacher step: eval-mode backbone under no_grad, normalised."""
            with torch.no_grad():
                F.normalize(model(x))
        return step

    build_teacher_cache(teacher, plain, cache_dir, meta, batch_size=batch, num_workers=0,
                        dtype="float32", progress=False)
    cache = TeacherEmbeddingCache(cache_dir, expect=meta)

    def distill_model(classes: int):
        torch.manual_seed(1)
        student = resolve_model(args.student)
        head = AdaDistillHead(512, classes, margin="arcface", s=64.0, m=0.45)
        return student, head, torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)

    def alone_model(classes: int):
        torch.manual_seed(1)
        student = resolve_model(args.student)
        head = MarginSoftmaxHead(512, classes, margin="arcface", s=64.0, m=0.5)
        return student, head, torch.optim.SGD(list(student.parameters())
                                               + list(head.parameters()), lr=0.1, momentum=0.9)

    def distill_step(model, source) -> Callable[[], None]:
        student, head, opt = model

        def step() -> None:
            f_t = source.teacher_embeddings(images, index, flipped)
            loss = head(student(images), labels, f_t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
            opt.step()
        return step

    def alone_step(model) -> Callable[[], None]:
        student, head, opt = model

        def step() -> None:
            loss = head(student(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
            opt.step()
        return step

    torch.manual_seed(3)
    tiny = TeacherHook(resolve_model("tiny_t", num_features=512))
    tiny_images = images[:1].clone()
    tiny_official = official_step(tiny.model, tiny_images)

    def repeated(step: Callable[[], None]) -> Callable[[], None]:
        def many() -> None:
            for _ in range(args.tiny_calls):
                step()
        return many

    variants: Dict[str, Callable[[], None]] = {
        ONLINE: distill_step(distill_model(args.num_classes), teacher),
        CACHED: distill_step(distill_model(args.num_classes), cache),
        ALONE: alone_step(alone_model(args.num_classes)),
    }
    if args.small_classes > 0:
        variants[CACHED_SMALL] = distill_step(distill_model(args.small_classes), cache)
        variants[ALONE_SMALL] = alone_step(alone_model(args.small_classes))
    variants.update({
        BUILD: build_once,
        FORWARD: forward_both_views,
        HOOK: lambda: teacher.teacher_embeddings(images, index, flipped),
        OFFICIAL: official_step(teacher.model, images),
        TINY_HOOK: repeated(lambda: tiny.teacher_embeddings(tiny_images, index[:1],
                                                            flipped[:1])),
        TINY_OFFICIAL: repeated(tiny_official),
    })
    times: Dict[str, List[float]] = {name: [] for name in variants}
    for step in variants.values():  # warm-up
        step()
    order = list(variants)
    for round_ in range(args.rounds):  # a, b, c, ..., then ..., c, b, a: pairs stay adjacent
        for name in (order if round_ % 2 == 0 else order[::-1]):
            times[name].append(timed(variants[name]))
    report(args, times, batch, len(plain))
    if args.onnx_rounds > 0:
        onnx_build_throughput(args, data, work)


def report(args: argparse.Namespace, times: Dict[str, List[float]], batch: int,
           built: int) -> None:
    """Print every variant's times and the per-round ratios (min / median over the rounds)."""
    rounds = range(args.rounds)
    print(f"teacher {args.teacher}, student {args.student}, batch {batch}, {args.num_classes} "
          f"classes (small head: {args.small_classes}), CPU threads {torch.get_num_threads()}, "
          f"{args.rounds} interleaved rounds; load average at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name, values in times.items():
        per = " ".join(f"{t:.3f}" for t in values)
        print(f"  {name:44s} median {statistics.median(values):8.3f} s   (rounds, s: {per})")

    def ratio(top: str, bottom: str) -> List[float]:
        return [times[top][r] / times[bottom][r] for r in rounds]

    print("ratios, each within one round (min / median over the rounds):")
    # build: len(plain) images of both views; forward: the batch's images of both views
    throughput = [(built / times[BUILD][r]) / (batch / times[FORWARD][r]) for r in rounds]
    print(f"  (a) cache build throughput / pure teacher forward of both views: "
          f"{spread(throughput)}")
    print(f"  (c) online hook (f) / official teacher step (g), {args.teacher}: "
          f"{spread(ratio(HOOK, OFFICIAL), 3)}")
    print(f"      the hook's own cost: (h) / (i), tiny_t on 1 image: "
          f"{spread(ratio(TINY_HOOK, TINY_OFFICIAL), 3)}")
    e = args.epochs
    heads = [(args.num_classes, CACHED, ALONE)]
    if args.small_classes > 0:
        heads.append((args.small_classes, CACHED_SMALL, ALONE_SMALL))
    for classes, cached, alone in heads:
        projection = [(times[BUILD][r] / built + e * times[cached][r] / batch)
                      / (e * times[alone][r] / batch) for r in rounds]
        floor = [(times[FORWARD][r] / batch + e * times[cached][r] / batch)
                 / (e * times[alone][r] / batch) for r in rounds]
        print(f"  {classes} classes: cached step / student-alone step: "
              f"{spread(ratio(cached, alone))}")
        print(f"  (b) {classes} classes, projected {e}-epoch run, cache build + cached run / "
              f"student alone: {spread(projection)}")
        print(f"      its floor (build = pure forward of both views): {spread(floor)}")
    print(f"  {args.num_classes} classes, online step (a) / student-alone step (c): "
          f"{spread(ratio(ONLINE, ALONE))}")


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
