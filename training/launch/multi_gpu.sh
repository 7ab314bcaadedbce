#!/usr/bin/env bash
# One node, N GPUs, FSDP2 (switched on automatically under torchrun). The global batch is
# micro_batch_size x grad_accum x N sequences; halve grad_accum when doubling N to keep it.
#   NGPUS=8 training/launch/multi_gpu.sh training/configs/smollm2_h100.yaml [--set key=value ...]
set -euo pipefail
CONFIG=${1:?usage: multi_gpu.sh CONFIG.yaml [supernet options...]}
shift
STAGE=${STAGE:-distill}
NGPUS=${NGPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
if [ "${NGPUS}" -lt 1 ]; then echo "error: no GPU visible; set NGPUS or use single_gpu.sh" >&2; exit 2; fi
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# SIGTERM / SIGINT / SIGUSR1 to torchrun reach every rank, which checkpoints and exits 75
export TORCHELASTIC_SIGNALS_TO_HANDLE=${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
exec "${TORCHRUN:-torchrun}" --standalone --nproc_per_node "$NGPUS" -m supernet.cli.main "$STAGE" "$CONFIG" "$@"
