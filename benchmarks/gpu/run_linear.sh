# GPU call: GDN/KDA mixers (fla Triton path) checks, per-layer timings (decode eager and as CUDA graph
# replays) and a torch.profiler kernel breakdown of layer vs raw op, time-boxed.
# On the device machine, from the repo root, carrying .whl (the fla wheels):
#   bash benchmarks/gpu/run_linear.sh [TIME_LIMIT_S (default 210)] [more gpu_linear_mixers.py args, e.g. --only-smollm2]
# No new item starts after TIME_LIMIT_S; `timeout` kills the run 30 s later at the latest. The JSON in $OUT is
# rewritten after every row, so a killed run still returns what it finished ("complete": false).
#
# Triton cache: compilation and autotuning of fla's kernels cost most of a cold run. Triton writes both to
# TRITON_CACHE_DIR (fla 0.6.0 passes cache_results=True to every autotuner, FLA_CACHE_RESULTS=1 by default,
# so the chosen configs and their timings land there as *.autotune.json). This script packs that folder into
# $OUT/triton_cache.tgz (only the *.autotune.json files if the whole is over 48 MB). To reuse it on a later
# call: `mkdir -p .cache/triton && tar xzf <files_at>/triton_cache.tgz -C .cache/triton` here, and carry
# .cache/triton (gitignored) next to .whl; the keys hold the Triton version, GPU architecture (sm_90 for H100
# and H200 alike) and kernel source, so a stale entry is just not used. fla's own config cache
# (FLA_CACHE_MODE / FLA_CONFIG_DIR) needs per-GPU JSON files that the fla-core 0.6.0 wheel does not ship.
source benchmarks/gpu/setup.sh
LIMIT=${1:-210}
[ $# -gt 0 ] && shift
export TRITON_CACHE_DIR=/tmp/triton-cache
mkdir -p "$TRITON_CACHE_DIR"
if [ -d .cache/triton ]; then
  cp -r .cache/triton/. "$TRITON_CACHE_DIR"/
  echo "restored Triton cache: $(find "$TRITON_CACHE_DIR" -name '*.autotune.json' | wc -l) autotune results, $(du -sh "$TRITON_CACHE_DIR" | cut -f1)"
fi
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
# pack the Triton cache for a later call
cache_mb=$(du -sm "$TRITON_CACHE_DIR" | cut -f1)
if [ "$cache_mb" -le 48 ]; then
  tar czf "$OUT/triton_cache.tgz" -C "$TRITON_CACHE_DIR" .
else
  (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' -print0 | tar czf "$OUT/triton_cache.tgz" --null -T -)
fi
echo "Triton cache ${cache_mb} MB -> $OUT/triton_cache.tgz ($(du -h "$OUT/triton_cache.tgz" | cut -f1))"
rm -f "$OUT/gpu_linear_mixers.json.tmp"
exit $rc
