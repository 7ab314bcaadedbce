# GPU call: whole-model decode speed of the e2e presets, CUDA graphs vs eager, side by side, plus
# the graphed-vs-eager token check and the per-layer cost table. Needs only the wheels (.whl).
source benchmarks/gpu/setup.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout ${DECODE_LIMIT:-420} python3 benchmarks/gpu_decode_presets.py --presets benchmarks/results/e2e_presets.json \
  --out $OUT/gpu_decode_presets.json 2>&1 | tee $OUT/gpu_decode_presets.log | grep -v Warning
bash benchmarks/gpu/pack_triton_cache.sh
