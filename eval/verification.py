"""Accuracy on arcface_torch's .bin verification sets (10-fold Accuracy-Flip and XNorm).

    python eval/verification.py --model-prefix work_dirs/r50/model.pt --network r50 \
        --data-dir data/faces_emore --targets lfw,cfp_fp,agedb_30 --json results/ver.json
    python eval/verification.py --model-prefix student.onnx --data-dir data/faces_emore

The protocol is documented in ``eval/bin_verification.py``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval.bin_verification import main  # noqa: E402

if __name__ == "__main__":
    main()
