"""Accuracy on arcface_torch's .bin verification sets (10-fold Accuracy-Flip and XNorm).

    python eval/verification.py --model-prefix work_dirs/r50/model.pt --network r50 \
        --data-dir data/faces_emore --targets lfw,cfp_fp,agedb_30 --json results/ver.json
    python eval/verification.py --model-prefix student.onnx --data-dir data/faces_emore

The protocol is documented in ``host/verification.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from host import verification  # noqa: E402
from host.model_io import load_embedder, save_text  # noqa: E402


def main(argv: Optional[List[str]] = None) -> List[verification.VerificationResult]:
    parser = argparse.ArgumentParser(description="10-fold verification on .bin sets")
    parser.add_argument("--model-prefix", required=True, help="backbone checkpoint or .onnx")
    parser.add_argument("--network", default="r50", help="backbone name of a torch checkpoint")
    parser.add_argument("--num-features", default=512, type=int, help="embedding size D")
    parser.add_argument("--data-dir", required=True, help="folder holding <target>.bin")
    parser.add_argument("--targets", default="lfw,cfp_fp,agedb_30",
                        help="comma-separated set names (files <data-dir>/<name>.bin)")
    parser.add_argument("--batch-size", default=64, type=int, help="images per forward")
    parser.add_argument("--nfolds", default=10, type=int, help="cross-validation folds")
    parser.add_argument("--device", default=None, help="torch device (default cuda if present)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    embedder = load_embedder(args.model_prefix, args.network, args.device, args.num_features,
                             autocast=False)
    results = []
    for name in [t for t in args.targets.split(",") if t]:
        data = verification.load_bin(os.path.join(args.data_dir, f"{name}.bin"))
        results.append(verification.verify(data, embedder, args.batch_size, args.nfolds))
    print(verification.format_results(results))
    if args.json:
        payload = {"model": embedder.description, "nfolds": args.nfolds,
                   "results": {r.name: dataclasses.asdict(r) for r in results}}
        save_text(args.json, json.dumps(payload, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
