# GPU call on a 2-GPU machine (issue 4), after a call that carried .whl and .teacher/a; this one carries
# .teacher/b and .data. Same global batch (32 x 2048 tokens) on one GPU (16 x 2 accumulation) and on
# two GPUs under torchrun + FSDP2 (16 per GPU), same seed and placements: scaling efficiency and the
# per-step loss difference (--compare-to). Eager (no --compile), so the two runs differ only in FSDP2.
source benchmarks/gpu/setup.sh
nvidia-smi -L
COMMON="--teacher /tmp/SmolLM2-135M-Instruct.Q4_1.gguf --data .data/pydocs-train.jsonl --eval-data .data/pydocs-eval.jsonl
  --seq-len 2048 --batch 16 --no-baseline --budget-tokens 0 --offline-topk 0 --warmup 5 --steps 30 --time-limit 200"
CUDA_VISIBLE_DEVICES=0 timeout -k 10 240 python3 benchmarks/bench_training.py $COMMON --grad-accum 2 \
  --work-dir /tmp/w1 --out $OUT/training_1gpu_accum2.json > $OUT/fsdp2_1gpu.log 2>&1
echo "1 GPU exit $?"; grep -v "Warn\|warn\|Converting\|Loading\|Writing" $OUT/fsdp2_1gpu.log | tail -8
timeout -k 10 280 torchrun --nproc_per_node 2 benchmarks/bench_training.py $COMMON --grad-accum 1 \
  --work-dir /tmp/w2 --compare-to $OUT/training_1gpu_accum2.json --out $OUT/training_fsdp2_2gpu.json > $OUT/fsdp2_2gpu.log 2>&1
echo "2 GPUs exit $?"; grep -v "Warn\|warn\|Converting\|Loading\|Writing" $OUT/fsdp2_2gpu.log | tail -12
