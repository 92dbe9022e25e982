"""Export a backbone checkpoint to ONNX (InsightFace / ICCV21-MFR format) and check it.

    python eval/export_onnx.py --model-prefix work_dirs/student/model.pt \
        --network mobilefacenet --output student.onnx --check-mfr

Checks, printed: onnxruntime vs torch (max |cos - 1| < 1e-4 on random images), InsightFace's
``model_zoo.get_model`` loads it as a recognition model whose ``get_feat`` matches torch, and with
``--check-mfr`` the ICCV21-MFR submission constraints (see ``eval/onnx_export.py``).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval import onnx_export  # noqa: E402
from eval.model_io import load_backbone  # noqa: E402

TOLERANCE = 1e-4


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description="backbone checkpoint -> ONNX, with checks")
    parser.add_argument("--model-prefix", required=True, help="backbone checkpoint (model.pt)")
    parser.add_argument("--network", required=True, help="backbone name, e.g. mobilefacenet")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--num-features", default=512, type=int, help="embedding size D")
    parser.add_argument("--opset", default=onnx_export.DEFAULT_OPSET, type=int,
                        help="ONNX opset (13: what the ICCV21-MFR server's onnxruntime 1.6 runs)")
    parser.add_argument("--check-mfr", action="store_true",
                        help="also check the ICCV21-MFR submission constraints")
    args = parser.parse_args(argv)

    backbone = load_backbone(args.model_prefix, args.network, args.num_features)
    onnx_export.export_onnx(backbone, args.output, args.opset)
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 2 ** 20:.2f} MiB, "
          f"opset {args.opset}, input {onnx_export.INPUT_NAME} [N, 3, 112, 112] float32 RGB, "
          f"mean/std 127.5 applied outside the graph)")
    failures = []
    cos_error = onnx_export.compare_with_torch(backbone, args.output)
    print(f"onnxruntime vs torch: max |cos - 1| = {cos_error:.3e} (limit {TOLERANCE:g})")
    if cos_error >= TOLERANCE:
        failures.append(f"onnxruntime and torch disagree (max |cos - 1| = {cos_error:.3e})")
    insight = onnx_export.check_insightface(backbone, args.output)
    print(f"insightface.model_zoo.get_model: {insight['class']} taskname={insight['taskname']} "
          f"mean/std={insight['input_mean']}/{insight['input_std']}, get_feat vs torch: "
          f"max |cos - 1| = {insight['max_abs_cos_minus_1']:.3e}")
    if insight["max_abs_cos_minus_1"] >= TOLERANCE:
        failures.append("insightface get_feat disagrees with torch")
    result = {"output": args.output, "cos_error": cos_error, "insightface": insight}
    if args.check_mfr:
        problems, facts = onnx_export.check_mfr(args.output, args.num_features)
        print(f"ICCV21-MFR facts: {facts}")
        print("ICCV21-MFR constraints: " + ("all met" if not problems else "; ".join(problems)))
        failures += problems
        result["mfr"] = {"problems": problems, "facts": facts}
    if failures:
        raise SystemExit(f"{args.output}: checks failed: " + "; ".join(failures))
    return result


if __name__ == "__main__":
    main()
