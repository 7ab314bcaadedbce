# GPU call: GDN/KDA mixers (fla Triton path) checks, per-layer timings (decode eager and as CUDA graph
# replays) and a torch.profiler kernel breakdown of layer vs raw op, time-boxed.
# On the device machine, from the repo root, carrying .whl (the fla wheels):
#   bash benchmarks/gpu/run_linear.sh [TIME_LIMIT_S (default 210)] [more gpu_linear_mixers.py args, e.g. --only-smollm2,
#   or --items 'tokens=32768|facts' for only the rows whose names match, after the checks]
# No new item starts after TIME_LIMIT_S; `timeout` kills the run 30 s later at the latest. The JSON in $OUT is
# rewritten after every row, so a killed run still returns what it finished ("complete": false).
#
# Triton cache: restored by setup.sh from a carried .cache/triton, packed into $OUT at the end
# (benchmarks/gpu/pack_triton_cache.sh says how to reuse it).
source benchmarks/gpu/setup.sh
LIMIT=${1:-210}
[ $# -gt 0 ] && shift
export TRITON_PRINT_AUTOTUNING=1  # the log then says which kernel was autotuned for how long
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__)"
set -o pipefail
timeout $((${LIMIT%.*} + 30)) python3 benchmarks/gpu_linear_mixers.py --time-limit "$LIMIT" \
  --out "$OUT/gpu_linear_mixers.json" "$@" 2>&1 | tee "$OUT/gpu_linear_mixers.log" \
  | grep --line-buffered -v -e Warning -e '^Autotuning kernel' -e '^Triton autotuning for function' \
      -e '^with key as' -e '^finished after' -e '^best config selected'
rc=$?
echo "gpu_linear_mixers.py exit status $rc (124: killed by timeout; the JSON holds what finished)"
grep -h -A2 '^Triton autotuning for function' "$OUT/gpu_linear_mixers.log" | grep -c '^finished after' \
  | xargs echo "autotuning runs:"
bash benchmarks/gpu/pack_triton_cache.sh
rm -f "$OUT/gpu_linear_mixers.json.tmp"
exit $rc
