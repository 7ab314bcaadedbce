#!/usr/bin/env bash
# The GPU calls of the vLLM run (issue 22), each from the repo root carrying one piece of
# .gpu22/ (benchmarks/gpu/vllm_bundle.sh makes them), in consecutive calls while the machine stays warm:
#   call 1, carry .gpu22/c1:  bash benchmarks/gpu/run_vllm.sh stash
#   call 2, carry .gpu22/c2:  bash benchmarks/gpu/run_vllm.sh reference   # our engine, in the background
#   call 3, carry .gpu22/c3:  bash benchmarks/gpu/run_vllm.sh stash
#   call 4, carry .gpu22/c4:  BUDGET=480 bash benchmarks/gpu/run_vllm.sh run [bench_vllm_gpu.py options]
#   later calls:              BUDGET=480 bash benchmarks/gpu/run_vllm.sh run ...   (resumes: done jobs are skipped)
# Results come back as $OUT/b22.tgz (every job's JSON and log) and $OUT/vllm_gpu_h200.json.
set -uo pipefail
source benchmarks/gpu/vllm_setup.sh
W=/tmp/b22
mkdir -p "$W"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
stage=${1:-run}
shift || true
case "$stage" in
  stash) ;;
  reference)
    setsid nohup python3 benchmarks/bench_vllm_gpu.py --parts reference --work "$W" --out "$W/report-reference.json" \
      > "$W/reference-background.log" 2>&1 < /dev/null &
    sleep 25; tail -n 4 "$W/reference-background.log" ;;
  run)
    [ "${VLLM_READY:-0}" = 1 ] || { echo "run_vllm: vLLM is not installed yet"; exit 3; }
    while pgrep -f "parts reference" > /dev/null; do sleep 2; done  # the background reference run
    tail -n 3 "$W/reference-background.log" 2>/dev/null
    python3 benchmarks/bench_vllm_gpu.py --work "$W" --budget-s "${BUDGET:-480}" "$@" ;;
  *) echo "run_vllm: unknown stage $stage (stash | reference | run)"; exit 2 ;;
esac
tar -czf "$OUT/b22.tgz" -C "$W" --exclude=./supernet --exclude='*.job' . 2>/dev/null
cp benchmarks/results/vllm_gpu_h200.json "$OUT/" 2>/dev/null
exit 0
