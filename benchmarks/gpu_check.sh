#!/usr/bin/env bash
# One prepared GPU check of Mask Inversion (see benchmarks/gpu_check.py): kernels and the CUDA engine
# against CPU, ms per object of today's engine vs the fused kernels (+ CUDA graph, TF32, bf16) for
# SigLIP-B/16-384, DINOv2-B/14-224 and CLIP-B/16-224, GPU utilisation; one table, also written to
# $OUT/gpu_check.txt when OUT is set. Meant to finish in < 6 minutes on one H100 / H200.
#
#   bash benchmarks/gpu_check.sh                       # on the CUDA machine (python3 there holds torch)
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --device cpu --quick   # logic check on a CPU
#
# Extra arguments go to gpu_check.py. LIMIT (seconds, default 420) bounds the whole run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LIMIT="${LIMIT:-420}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ -n "${OUT:-}" ]]; then mkdir -p "$OUT"; fi
{
    echo "== $(date -u +%FT%TZ) $(hostname)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    fi
    "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee ${OUT:+"$OUT/gpu_check_env.txt"}
status=0
timeout "$LIMIT" "$PYTHON" benchmarks/gpu_check.py "$@" 2>&1 | tee ${OUT:+"$OUT/gpu_check_log.txt"} || status=$?
if [[ $status -ne 0 ]]; then echo "gpu_check: exit status $status (124 = over LIMIT=${LIMIT}s)"; fi
exit $status
