# GPU call 2 (right after run_kernels.sh, carrying .teacher/b and .data): stage-1 throughput vs the
# HF baseline on the real SmolLM2 teacher, and held-out KL per single-mixer placement before/after.
source benchmarks/gpu/setup.sh
ls -la /tmp/SmolLM2-135M-Instruct.Q4_1.gguf
timeout 500 python3 benchmarks/bench_training.py --teacher /tmp/SmolLM2-135M-Instruct.Q4_1.gguf \
  --data .data/pydocs-train.jsonl --eval-data .data/pydocs-eval.jsonl --time-limit 330 \
  --out $OUT/training_h100.json --work-dir /tmp/bench-work 2>&1 | tee $OUT/training_h100.log | grep -v Warning
