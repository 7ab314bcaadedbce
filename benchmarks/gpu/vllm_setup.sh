# Source on the GPU machine at the start of every call of the vLLM run (issue 22), from the repo root,
# carrying one of .gpu22/c1 .. c4 (made here by benchmarks/gpu/vllm_bundle.sh):
#   source benchmarks/gpu/vllm_setup.sh
# Stashes the carried pieces in /tmp/g22 (which lives as long as the machine stays warm); once the
# teacher halves are there it joins the GGUF and installs fla and gguf; once every piece of the
# manifest is there it unpacks vLLM and installs its wheels, then this repo (for vLLM's plugin entry
# point), all into /tmp/site; this repo is installed editable into the machine's Python. Sets VLLM_READY=1 when vLLM imports.
mkdir -p /tmp/g22 /tmp/site
for d in .gpu22/c1 .gpu22/c2 .gpu22/c3 .gpu22/c4; do [ -d "$d" ] && cp -n "$d"/* /tmp/g22/ 2>/dev/null; done
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export SUPERNET_CACHE=/tmp/supernet-cache SUPERNET_DATA=/tmp/g22
export TRITON_CACHE_DIR=/tmp/triton-cache VLLM_CACHE_ROOT=/tmp/vllm-cache
mkdir -p "$SUPERNET_CACHE/teacher" "$TRITON_CACHE_DIR"
gguf=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ] && [ -f /tmp/g22/part-a ] && [ -f /tmp/g22/part-b ]; then
  cat /tmp/g22/part-a /tmp/g22/part-b > "$gguf" && sha256sum -c /tmp/g22/gguf.sha256 || rm -f "$gguf"
fi
[ -f "$gguf" ] && ln -sf "$gguf" "$SUPERNET_CACHE/teacher/"
if [ ! -f /tmp/site/.early ] && [ -f /tmp/g22/gguf-0.19.0-py3-none-any.whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    /tmp/g22/fla_core-*.whl /tmp/g22/flash_linear_attention-*.whl /tmp/g22/gguf-*.whl && touch /tmp/site/.early
fi
# this repo, editable (the supernet.* namespace maps folders through setuptools' editable finder;
# its dist-info carries vLLM's plugin entry point); the machine is throwaway, so into its own venv
if ! python3 -c "import supernet.serving.plan" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/tmp/g22/pip-e.log 2>&1 ||
    { echo "vllm_setup: editable install failed"; tail -5 /tmp/g22/pip-e.log; }
fi
missing=0
if [ -f /tmp/g22/MANIFEST ]; then
  while read -r piece; do [ -e "/tmp/g22/$piece" ] || missing=$((missing + 1)); done < /tmp/g22/MANIFEST
else
  missing=unknown
fi
echo "vllm_setup: teacher $([ -f "$gguf" ] && echo joined || echo pending); pieces missing: $missing"
if [ "$missing" = 0 ] && [ ! -f /tmp/site/.vllm ]; then
  t0=$(date +%s)
  (cd /tmp/g22 && cat vllm.xz.00 vllm.xz.01 > vllm-0.26.0-slim.tar.xz && sha256sum -c vllm.sha256) &&
  tar -C /tmp/site -xJf /tmp/g22/vllm-0.26.0-slim.tar.xz &&
  ls /tmp/g22/*.whl | grep -v -e fla_core -e flash_linear -e gguf- |
    xargs python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site/.deps &&
  cp -rn /tmp/site/.deps/. /tmp/site/ && rm -rf /tmp/site/.deps &&
  touch /tmp/site/.vllm
  echo "vllm_setup: installed in $(( $(date +%s) - t0 )) s"
fi
if [ -f /tmp/site/.vllm ] && python3 -c "import vllm, importlib.metadata as m; print('vllm', vllm.__version__, 'plugins', [e.value for e in m.entry_points(group='vllm.general_plugins')])"; then
  export VLLM_READY=1
fi
