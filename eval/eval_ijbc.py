"""IJB-B / IJB-C 1:1 verification (TAR@FAR), with arcface_torch's eval_ijbc.py flags.

    python eval/eval_ijbc.py --model-prefix work_dirs/r50/model.pt --network r50 \
        --image-path data/IJBC --result-dir results --job r50 --target IJBC
    python eval/eval_ijbc.py --model-prefix student.onnx --image-path data/IJBC --job student
    python eval/eval_ijbc.py --features results/r50/ijbc_features.npy --image-path data/IJBC \
        --job r50_strict --far-rule strict
    python eval/eval_ijbc.py --image-path data/IJBC --job table \
        --compare teacher=results/r50/ijbc.npy student=results/student/ijbc.npy

Writes ``<result-dir>/<job>/<target>.npy`` (pair scores), ``<target>_features.npy`` (image
features ``[N, 2D]``, plain | mirror), ``<target>.json`` (TAR@FAR in percent) and
``<target>_roc.{png,pdf}``; the pipeline is documented in ``eval/ijb.py``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval import ijb  # noqa: E402
from eval.model_io import load_embedder  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="IJB-B/C template verification (TAR@FAR)")
    parser.add_argument("--model-prefix", default="",
                        help="backbone checkpoint (model.pt / checkpoint_gpu_0.pt) or .onnx file")
    parser.add_argument("--image-path", required=True,
                        help="IJB folder holding meta/ and loose_crop/")
    parser.add_argument("--result-dir", default=".", help="outputs go to <result-dir>/<job>/")
    parser.add_argument("--batch-size", default=128, type=int, help="images per batch")
    parser.add_argument("--network", default="r50", help="backbone name of a torch checkpoint")
    parser.add_argument("--num-features", default=512, type=int, help="embedding size D")
    parser.add_argument("--job", default="insightface", help="job name (output sub-folder)")
    parser.add_argument("--target", default="IJBC", choices=ijb.TARGETS)
    parser.add_argument("--features", default=None,
                        help="score precomputed image features [N, 2D] .npy (no model)")
    parser.add_argument("--num-workers", default=4, type=int,
                        help="DataLoader processes decoding and aligning images")
    parser.add_argument("--far-rule", default="closest", choices=ijb.RULES,
                        help="closest: the ROC point with FPR nearest the target (published); "
                             "strict: best TPR with FPR <= target")
    parser.add_argument("--compare", nargs="+", default=[], metavar="[NAME=]SCORES.npy",
                        help="tabulate and plot several score files together (no model)")
    parser.add_argument("--scores", action="append", default=[], metavar="[NAME=]SCORES.npy",
                        help="same as --compare, one file per flag (repeatable)")
    parser.add_argument("--device", default=None, help="torch device (default cuda if present)")
    parser.add_argument("--fp32", action="store_true", help="no float16 autocast on CUDA")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser


def main(argv: Optional[List[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    score_files = args.compare + args.scores
    if score_files:
        if args.model_prefix or args.features:
            raise SystemExit("--compare/--scores tabulate existing score files; "
                             "do not combine them with --model-prefix or --features")
        _, labels = ijb.read_pairs(ijb.meta_paths(args.image_path, args.target)["pairs"])
        return ijb.compare_scores(labels, score_files, args.result_dir, args.job, args.target,
                                  args.far_rule)
    if bool(args.model_prefix) == bool(args.features):
        raise SystemExit("pass exactly one of --model-prefix (a model) or --features (a .npy)")
    meta = ijb.load_meta(args.image_path, args.target)
    embedder = None
    if args.model_prefix:
        embedder = load_embedder(args.model_prefix, args.network, args.device,
                                 args.num_features, autocast=not args.fp32)
    return ijb.run_ijb(meta, args.result_dir, args.job, args.far_rule, embedder=embedder,
                       features_path=args.features, batch_size=args.batch_size,
                       num_workers=args.num_workers, progress=not args.no_progress)


if __name__ == "__main__":
    main()
