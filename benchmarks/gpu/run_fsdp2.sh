# Issue 4 on a 2-GPU machine: the same global batch (32 x 2048 tokens) on one GPU (16 x 2 accumulation)
# and on two GPUs under torchrun + FSDP2 (16 per GPU), same seed and placements -> scaling efficiency
# and per-step loss difference (--compare-to). Eager (no --compile): the runs differ only in FSDP2.
#   call A (carry .whl, .teacher/a): source benchmarks/gpu/setup.sh
#   call B (carry .teacher/b, .data): bash benchmarks/gpu/run_fsdp2.sh 1     # one GPU, ~5 min
#   call C (carry .data):             bash benchmarks/gpu/run_fsdp2.sh 2     # two GPUs, ~5 min
# fla autotunes its training kernels on the first steps (164-178 s seen on an H200), so each run gets
# its own call and a time limit well past that; the 1-GPU result waits in /tmp/fsdp2 for call C.
source benchmarks/gpu/setup.sh
nvidia-smi -L
mkdir -p /tmp/fsdp2
COMMON="--teacher /tmp/SmolLM2-135M-Instruct.Q4_1.gguf --data .data/pydocs-train.jsonl --eval-data .data/pydocs-eval.jsonl
  --seq-len 2048 --batch 16 --no-baseline --budget-tokens 0 --offline-topk 0 --warmup 10 --steps 30 --time-limit 480"
if [ "${1:-1}" = 1 ]; then
  CUDA_VISIBLE_DEVICES=0 timeout -k 10 520 python3 benchmarks/bench_training.py $COMMON --grad-accum 2 \
    --work-dir /tmp/w1 --out /tmp/fsdp2/training_1gpu_accum2.json > /tmp/fsdp2/1gpu.log 2>&1
  echo "1 GPU exit $?"; grep -v "Warn\|warn\|Converting\|Loading\|Writing" /tmp/fsdp2/1gpu.log | tail -8
else
  timeout -k 10 520 torchrun --nproc_per_node 2 benchmarks/bench_training.py $COMMON --grad-accum 1 \
    --work-dir /tmp/w2 --compare-to /tmp/fsdp2/training_1gpu_accum2.json \
    --out /tmp/fsdp2/training_fsdp2_2gpu.json > /tmp/fsdp2/2gpu.log 2>&1
  echo "2 GPUs exit $?"; grep -v "Warn\|warn\|Converting\|Loading\|Writing" /tmp/fsdp2/2gpu.log | tail -12
fi
cp /tmp/fsdp2/*.json /tmp/fsdp2/*.log $OUT/ 2>/dev/null || true
