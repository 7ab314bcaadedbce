# Source on the GPU machine at the start of every call of the e2e run (issue 23), from the repo root,
# carrying .gpu23/c1 or .gpu23/c2 (made here by benchmarks/gpu/e2e_bundle.sh) or nothing:
#   source benchmarks/gpu/e2e_setup.sh
# Stashes whatever pieces arrived in /tmp/g23 (which lives as long as the machine stays warm). Once
# every piece of the manifest is there, once: checks them, joins the teacher GGUF into
# $SUPERNET_CACHE/teacher, installs the wheels into /tmp/site (no index, no dependencies: the set is
# complete, see e2e_wheels.py), unpacks the corpus into /tmp/data and the BIG-bench task files into
# $SUPERNET_CACHE/bigbench, and installs this repo editable (the supernet.* namespace maps folders
# through setuptools' editable finder). Idempotent; sets E2E_READY=1 when all of that is done.
# Never exits: it is sourced.
mkdir -p /tmp/g23 /tmp/site /tmp/data
for d in .gpu23/c1 .gpu23/c2; do [ -d "$d" ] && cp -rn "$d"/. /tmp/g23/ 2>/dev/null; done
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export SUPERNET_CACHE=/tmp/supernet-cache SUPERNET_DATA=/tmp/data
# nothing is reachable there: make every Hugging Face library fail fast instead of retrying the network
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$SUPERNET_CACHE/teacher" "$SUPERNET_CACHE/bigbench"
# Triton's on-disk cache, restored from .cache/triton when carried (as setup.sh does: fla's
# autotuning results skip minutes of benchmarking configs)
export TRITON_CACHE_DIR=/tmp/triton-cache
mkdir -p "$TRITON_CACHE_DIR"
if [ -d .cache/triton ]; then
  cp -rn .cache/triton/. "$TRITON_CACHE_DIR"/ 2>/dev/null || true
  echo "e2e_setup: restored Triton cache: $(find "$TRITON_CACHE_DIR" -name '*.autotune.json' | wc -l) autotune results"
fi
E2E_READY=0
_e2e_missing=unknown
if [ -f /tmp/g23/MANIFEST ]; then
  _e2e_missing=0
  while read -r piece; do [ -e "/tmp/g23/$piece" ] || _e2e_missing=$((_e2e_missing + 1)); done < /tmp/g23/MANIFEST
fi
if [ "$_e2e_missing" = 0 ] && [ ! -f /tmp/g23/.installed ]; then
  _e2e_t0=$(date +%s)
  _gguf=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
  if (cd /tmp/g23 && sha256sum -c --quiet SHA256SUMS) &&
     cat /tmp/g23/part-a /tmp/g23/part-b > "$_gguf" && sha256sum -c --quiet /tmp/g23/gguf.sha256 &&
     ln -sf "$_gguf" "$SUPERNET_CACHE/teacher/" &&
     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
       /tmp/g23/wheels/*.whl > /tmp/g23/pip.log 2>&1 &&
     gunzip -c /tmp/g23/pydocs-train.jsonl.gz > /tmp/data/pydocs-train.jsonl &&
     gunzip -c /tmp/g23/pydocs-eval.jsonl.gz > /tmp/data/pydocs-eval.jsonl &&
     cp /tmp/g23/bigbench/*.json "$SUPERNET_CACHE/bigbench/"; then
    touch /tmp/g23/.installed
    echo "e2e_setup: teacher joined and checked, $(ls /tmp/g23/wheels | wc -l) wheels installed, corpus and" \
         "$(ls "$SUPERNET_CACHE/bigbench" | wc -l) BIG-bench tasks in place in $(( $(date +%s) - _e2e_t0 )) s"
  else
    echo "e2e_setup: FAILED to check/join/install the pieces (see above and /tmp/g23/pip.log)"
    tail -5 /tmp/g23/pip.log 2>/dev/null
  fi
fi
# this repo, editable, into the machine's Python (again whenever the repo root moved between calls)
if [ -f /tmp/g23/.installed ] && [ "$(cat /tmp/g23/.editable 2>/dev/null)" != "$PWD" ]; then
  if python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/g23/pip-e.log 2>&1 &&
     python3 -c "import supernet.cli.main, supernet.placement.cost" 2>>/tmp/g23/pip-e.log; then
    echo "$PWD" > /tmp/g23/.editable
  else
    echo "e2e_setup: editable install of the repo failed"; tail -5 /tmp/g23/pip-e.log
  fi
fi
[ -f /tmp/g23/.installed ] && [ "$(cat /tmp/g23/.editable 2>/dev/null)" = "$PWD" ] && E2E_READY=1
echo "e2e_setup: pieces missing: $_e2e_missing; ready: $E2E_READY"
