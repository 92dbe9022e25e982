#!/usr/bin/env bash
# One GPU's measurements in one go (about 6 minutes on one H200), for a session that has a GPU:
#
#     bash bench/gpu_check.sh [OUT]                  # OUT defaults to work_dirs/gpu_check
#     ARCFACE_TORCH=/path/to/insightface bash bench/gpu_check.sh   # + upstream's own train_v2
#
# 1. bench/gpu_throughput.py: the side-by-side step table (upstream-style step, our train_step,
#    our trainer through its loader; AdaDistill / GKD online and cached, fp16 / fp32, compile);
#    OUT/gpu_throughput.md and .json, rewritten after every round, so a run cut short by its
#    time limit still leaves the rounds it finished.
# 2. bench/gpu_acceptance.py with its defaults: every stage of the product, PASS / FAIL lines and
#    the training stages' samples/s.
# Everything either prints goes to OUT/gpu_throughput.txt and OUT/gpu_acceptance.txt; the exit
# status is 1 when either failed or ran out of time.  Time limits (6 minutes together):
# THROUGHPUT_S (default 180 s; its table keeps the rounds finished by then) and ACCEPTANCE_S
# (default 180 s).  Both sizes are estimates: neither script has run on a GPU yet.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-work_dirs/gpu_check}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    >> "$OUT/gpu.txt" 2>&1
upstream=()
if [ -n "${ARCFACE_TORCH:-}" ]; then upstream=(--arcface-torch "$ARCFACE_TORCH"); fi
status=0
timeout "${THROUGHPUT_S:-180}" "$PYTHON" bench/gpu_throughput.py --out "$OUT/gpu_throughput" \
    --workdir work_dirs/gpu_throughput "${upstream[@]}" > "$OUT/gpu_throughput.txt" 2>&1 \
    || status=1
timeout "${ACCEPTANCE_S:-180}" "$PYTHON" bench/gpu_acceptance.py \
    > "$OUT/gpu_acceptance.txt" 2>&1 || status=1
cat "$OUT/gpu.txt"
[ -f "$OUT/gpu_throughput.md" ] && cat "$OUT/gpu_throughput.md"
tail -n 25 "$OUT/gpu_acceptance.txt"
exit $status
