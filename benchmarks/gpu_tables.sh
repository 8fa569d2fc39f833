#!/usr/bin/env bash
# Every GPU table of docs/performance.md in one go, on a machine with a CUDA device:
#   bash benchmarks/gpu_tables.sh [--reps 5]
# 1. the bench settings of perf_tables.py (DeiT-S 224/384 px, float32/bfloat16, batch 64, unpruned,
#    EViT and Rényi a=1,2,inf at keep 0.9/0.7/0.5; peaks from torch.cuda.max_memory_allocated),
# 2. the accuracy-vs-speed frontier (every method of docs/results.md §4 at budgets 0.9/0.75/0.65/0.5),
# each as JSON under benchmarks/results/gpu/ and as tables between the perf-gpu / frontier-gpu markers
# of docs/performance.md (plot: docs/figures/frontier_gpu.png). Extra arguments go to both scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to measure')"
"$PY" benchmarks/perf_tables.py --device cuda --only deit_small_224_fp32 deit_small_224_bf16 \
    deit_small_384_fp32 deit_small_384_bf16 deit_tiny_224_fp32 deit_tiny_224_bf16 "$@"
"$PY" benchmarks/perf_tables.py --device cuda --memory-only --only deit_small_224_fp32 deit_small_224_bf16 \
    deit_small_384_fp32 deit_small_384_bf16
"$PY" benchmarks/frontier.py --device cuda "$@"
echo "GPU tables written to docs/performance.md; JSON in benchmarks/results/gpu/"
