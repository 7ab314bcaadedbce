# GPU call 1 again after fixes: linear mixers (fla) and the SWA rows; stash teacher half a.
source benchmarks/gpu/setup.sh
timeout 240 python3 benchmarks/gpu_linear_mixers.py --out $OUT/gpu_linear_mixers.json 2>&1 | tee $OUT/gpu_linear_mixers.log | grep -v Warning
timeout 200 python3 benchmarks/gpu_model.py --mixers swa --out $OUT/gpu_model_swa.json 2>&1 | tee $OUT/gpu_model_swa.log | grep -v Warning
