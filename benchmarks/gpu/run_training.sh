# GPU call (issue 4), one box of at most ~7 minutes, carrying .whl, .teacher/a, .teacher/b and .data:
# stage-1 throughput at seq 2048, batch 16 on SmolLM2-135M with --compile: the plain HF baseline
# (eager), ours compiled, and ours eager on the same card when time is left. Throughput only: no
# held-out KL phase, no offline cache phase. The JSON is rewritten as phases finish, so a run cut
# short by the timeout still leaves its numbers ("partial": true).
source benchmarks/gpu/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
ls -la /tmp/SmolLM2-135M-Instruct.Q4_1.gguf
RES=$OUT/training_h100_compile.json
LOG=$OUT/training_h100_compile.log
# 350 s: training of the compiled run stops there, and the eager run only starts with 75 s left;
# 380 s: SIGTERM (the script writes what it has and exits), SIGKILL 15 s later
TORCH_LOGS=recompiles timeout -k 15 380 python3 benchmarks/bench_training.py \
  --teacher /tmp/SmolLM2-135M-Instruct.Q4_1.gguf --data .data/pydocs-train.jsonl --eval-data .data/pydocs-eval.jsonl \
  --seq-len 2048 --batch 16 --compile --eager-control --budget-tokens 0 --offline-topk 0 \
  --warmup 5 --steps 30 --time-limit 350 --eager-min-s 75 \
  --out $RES --work-dir /tmp/bench-work > $LOG 2>&1
echo "exit code $?"
grep -v "Loading weights\|Writing model shards\|Warning\|warn(\|^  *warnings.warn\|^\(V\|I\)[0-9]" $LOG | tail -40
# the numbers again from the JSON (also when the process had to be killed before printing them)
python3 - "$RES" <<'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as exc:
    sys.exit(f"no result JSON: {exc}")
print(f"\nJSON: partial={r.get('partial')} phase={r.get('phase')} elapsed={r.get('elapsed_s', 0):.0f}s {r.get('device')}")
for key in ("baseline", "ours", "ours_eager"):
    run = r.get(key) or {}
    tps = run.get("tokens_per_s")
    print(f"  {key:10s} tok/s={tps and round(tps)} peak={run.get('peak_mem_gib') and round(run['peak_mem_gib'], 1)}GiB "
          f"setup={run.get('setup_s') and round(run['setup_s'])}s precompile={run.get('precompile_s') and round(run['precompile_s'])}s "
          f"timed={run.get('timed_steps')} compiles_in_timing={run.get('compiles_during_timing')} status={run.get('status', 'done')}")
for key in ("speedup_vs_baseline", "speedup_eager_vs_baseline", "compile_speedup"):
    if key in r:
        print(f"  {key}: {r[key]:.2f}x")
EOF
bash benchmarks/gpu/pack_triton_cache.sh
