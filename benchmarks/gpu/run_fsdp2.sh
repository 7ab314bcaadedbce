# Issue 4 on a 2-GPU machine: the same global batch (32 x 2048 tokens) on one GPU (16 x 2 accumulation)
# and on two GPUs under torchrun + FSDP2 (16 per GPU), same seed and placements -> scaling efficiency
# and per-step loss difference (--compare-to). Eager (no --compile): the runs differ only in FSDP2.
#   call A (carry .whl, .teacher/a, .cache/triton if you have it): source benchmarks/gpu/setup.sh
#   call B (carry .teacher/b, .data): bash benchmarks/gpu/run_fsdp2.sh        # 1 GPU, then 2 GPUs twice
#   (teacher replicated, then sharded: LIMIT1 / LIMIT2 seconds each; 2r and 2 run one of them)
# fla autotunes its training kernels on the first step (164-178 s seen on an H200). fla 0.6.0 asks
# Triton to cache autotuning results on disk, so the 2-GPU run after the 1-GPU run in the same call
# (same TRITON_CACHE_DIR) skips most of it. Results wait in /tmp/fsdp2 between calls on a held
# machine, so `run_fsdp2.sh 1,2` then `run_fsdp2.sh 2r` splits the work over two calls.
# Runs are a comma list of 1, 2 and 2r, each optionally @K: K layers per FSDP2 unit
# (distributed.layers_per_unit; 0, the default, one unit per mixer; UNITS=K sets it for runs without
# @K). A run with @K writes training_fsdp2_2gpu${TAG}_uK.json, so layouts compare in one call:
#   bash benchmarks/gpu/run_fsdp2.sh 1,2@6,2@30,2r@30
source benchmarks/gpu/setup.sh
nvidia-smi -L
mkdir -p /tmp/fsdp2
COMMON="--teacher /tmp/SmolLM2-135M-Instruct.Q4_1.gguf --data .data/pydocs-train.jsonl --eval-data .data/pydocs-eval.jsonl
  --seq-len 2048 --batch 16 --no-baseline --budget-tokens 0 --offline-topk 0 --warmup 10 --steps 30 --profile-steps ${PROFILE:-2}"
MODE=${1:-both}
[ "$MODE" = both ] && MODE=1,2,2r
IFS=, read -ra RUNS <<< "$MODE"
for run in "${RUNS[@]}"; do
  kind=${run%@*}; units=${UNITS:-0}; tag=$TAG
  if [[ "$run" == *@* ]]; then units=${run#*@}; tag="${TAG}_u${units}"; fi
  case $kind in
    1)
      CUDA_VISIBLE_DEVICES=0 timeout -k 10 ${LIMIT1:-280} python3 benchmarks/bench_training.py $COMMON \
        --layers-per-unit $units --grad-accum 2 --time-limit $(( ${LIMIT1:-280} - 30 )) \
        --work-dir /tmp/w1 --out /tmp/fsdp2/training_1gpu_accum2.json > /tmp/fsdp2/1gpu.log 2>&1
      echo "1 GPU exit $?"; grep -v "Warn\|warn\|Converting\|Loading\|Writing" /tmp/fsdp2/1gpu.log | tail -8
      echo "Triton autotune results cached: $(find $TRITON_CACHE_DIR -name '*.autotune.json' | wc -l)" ;;
    2|2r)  # 2r: the teacher replicated (no all-gathers for it)
      extra=""; name=training_fsdp2_2gpu
      [ "$kind" = 2r ] && { extra="--replicate-teacher"; name=training_fsdp2_2gpu_replicated_teacher; }
      timeout -k 10 ${LIMIT2:-280} torchrun --nproc_per_node 2 benchmarks/bench_training.py $COMMON $extra \
        --layers-per-unit $units --grad-accum 1 --time-limit $(( ${LIMIT2:-280} - 30 )) \
        --work-dir /tmp/w$run --compare-to /tmp/fsdp2/training_1gpu_accum2.json \
        --out /tmp/fsdp2/$name$tag.json > /tmp/fsdp2/2gpu$tag$kind.log 2>&1
      echo "2 GPUs ($run) exit $?"; grep -v "Warn\|warn\|Converting\|Loading\|Writing" /tmp/fsdp2/2gpu$tag$kind.log | tail -10 ;;
    *) echo "unknown run '$run': use 1, 2 or 2r, each optionally @K (layers per unit)"; exit 2 ;;
  esac
done
ls /tmp/fsdp2/training_fsdp2_2gpu*.json >/dev/null 2>&1 && python3 benchmarks/plot_loss_curves.py \
  /tmp/fsdp2/training_1gpu_accum2.json /tmp/fsdp2/training_fsdp2_2gpu*.json --out /tmp/fsdp2/training_fsdp2_loss_curves.png
cp /tmp/fsdp2/*.json /tmp/fsdp2/*.png $OUT/ 2>/dev/null || true
bash benchmarks/gpu/pack_triton_cache.sh
