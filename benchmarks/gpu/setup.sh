# Source this on the GPU machine (from the repo root): installs the carried wheels (fla, gguf, typer,
# einops) into /tmp/site, puts the repo on PYTHONPATH, and stashes/joins the carried teacher halves.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null || true
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/teacher-parts
for d in .teacher/a .teacher/b; do [ -d "$d" ] && cp "$d"/* /tmp/teacher-parts/; done
if [ -f /tmp/teacher-parts/part-a ] && [ -f /tmp/teacher-parts/part-b ] && [ ! -f /tmp/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  cat /tmp/teacher-parts/part-a /tmp/teacher-parts/part-b > /tmp/SmolLM2-135M-Instruct.Q4_1.gguf
  sha256sum -c /tmp/teacher-parts/gguf.sha256
fi
# the teacher cache layout that supernet.teacher expects
export SUPERNET_CACHE=/tmp/supernet-cache
mkdir -p $SUPERNET_CACHE/teacher
[ -f /tmp/SmolLM2-135M-Instruct.Q4_1.gguf ] && ln -sf /tmp/SmolLM2-135M-Instruct.Q4_1.gguf $SUPERNET_CACHE/teacher/
# Triton's on-disk cache. fla 0.6.0 asks its autotuners to cache their results there
# (*.autotune.json), so a carried cache skips the benchmarking of every config, which cost 160-200 s
# of a cold training run's first step. Restored from .cache/triton when carried;
# benchmarks/gpu/pack_triton_cache.sh packs it into $OUT for the next session.
export TRITON_CACHE_DIR=/tmp/triton-cache
mkdir -p "$TRITON_CACHE_DIR"
if [ -d .cache/triton ]; then
  cp -rn .cache/triton/. "$TRITON_CACHE_DIR"/ 2>/dev/null || true
  echo "restored Triton cache: $(find "$TRITON_CACHE_DIR" -name '*.autotune.json' | wc -l) autotune results"
fi
