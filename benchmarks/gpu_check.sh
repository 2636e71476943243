#!/usr/bin/env bash
# One command that proves the CUDA paths (fp32, bf16, fp16 with loss scaling, torch.compile, a one-process NCCL
# group, generation) with short runs and writes the bench_core / bench_speed JSON for edm2-img512-xs and
# edm2-img512-s into one folder (default benchmarks/results/gpu-check), within 8 minutes on one H200.
# Without CUDA it runs the CPU checks and says what it skipped. See benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh [OUTDIR] [--budget SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec python benchmarks/gpu_check.py "$@"
