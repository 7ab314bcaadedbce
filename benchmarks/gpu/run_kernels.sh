# GPU call 1: issue-2 checks and timings (mixers vs CPU paths, per-layer tables, whole model vs HF).
source benchmarks/gpu/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, triton, transformers, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'fla', fla.__version__)"
timeout 200 python3 benchmarks/gpu_linear_mixers.py --time-limit 170 --out $OUT/gpu_linear_mixers.json 2>&1 | tee $OUT/gpu_linear_mixers.log | grep -v Warning
timeout 300 python3 benchmarks/gpu_model.py --out $OUT/gpu_model.json 2>&1 | tee $OUT/gpu_model.log | grep -v Warning
