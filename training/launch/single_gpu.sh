#!/usr/bin/env bash
# One GPU (or the CPU when none is visible).
#   training/launch/single_gpu.sh training/configs/smollm2_h100.yaml [--set key=value ...]
#   STAGE=sft training/launch/single_gpu.sh training/configs/sft_smoke_cpu.yaml
set -euo pipefail
CONFIG=${1:?usage: single_gpu.sh CONFIG.yaml [supernet options...]}
shift
STAGE=${STAGE:-distill}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
exec "${PYTHON:-python}" -m supernet.cli.main "$STAGE" "$CONFIG" "$@"
