#!/usr/bin/env bash
# Here (no GPU, needs root for unshare): rehearse the e2e calls offline before paying for a GPU.
#
#   bash benchmarks/gpu/e2e_offline_check.sh      # after benchmarks/gpu/e2e_bundle.sh
#
# Builds a stand-in for the GPU image under .gpu23/sim: a venv whose site-packages holds only the
# packages the image lists (benchmarks/gpu/device-packages.txt), linked from the development venv, so
# that a dependency missing from the bundle fails here as it would there. Then, in a private mount
# namespace with no network and a private /tmp: call 1 (c1 only) and call 2 (c2 added) of
# benchmarks/gpu/e2e_setup.sh, the import check of run_e2e2.sh's `start`, a conversion of the carried
# teacher, `supernet eval-tasks` (--limit 2) on one retrieval task and one BIG-bench development task
# and `supernet eval-placements` with a retrieval and a development-task metric, in a SUPERNET_CACHE
# filled only from the bundle.
# One difference from the GPU machine: the interpreter here is CPython 3.11, so the one wheel built for
# 3.12 only (multiprocess, py312) is swapped for the same version's py311 wheel in a copy of the calls.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
sim=$repo/.gpu23/sim
main_site=${MAIN_SITE:-$(cd "$(git rev-parse --path-format=absolute --git-common-dir)/.." && pwd)/.venv/lib/python3.11/site-packages}
[ -d .gpu23/c1 ] && [ -d .gpu23/c2 ] || { echo "run benchmarks/gpu/e2e_bundle.sh first" >&2; exit 1; }
rm -rf "$sim" && mkdir -p "$sim/tmp" "$sim/empty"
python3 -m venv --without-pip "$sim/venv"  # pip, setuptools and wheel: the image's, linked below
site=$("$sim/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
python3 - "$main_site" "$site" <<'EOF'
"""Link into the stand-in venv the top-level entries of every development-venv distribution the image lists."""
import importlib.metadata as md, os, re, sys
src, dst = sys.argv[1:]
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
allowed = {norm(l.strip()) for l in open("benchmarks/gpu/device-packages.txt") if l.strip() and not l.startswith("#")}
carried = {norm(l.split("==")[0]) for l in open("benchmarks/gpu/e2e-wheels.txt") if "==" in l and not l.startswith("#")}
dists = {norm(d.metadata["Name"]): d for d in md.distributions(path=[src])}
# the image's packages bring their own dependencies there; the development venv's versions of them may
# need others (a newer huggingface_hub, typer): link those too, but never a package the bundle carries
from packaging.requirements import Requirement
env_ok = lambda r: r.marker is None or r.marker.evaluate({"extra": ""})
link, stack, extra = set(), [n for n in allowed if n in dists], set()
while stack:
    n = stack.pop()
    if n in link or n in carried or n not in dists:
        continue
    link.add(n)
    if n not in allowed:
        extra.add(n)
    stack += [norm(Requirement(r).name) for r in dists[n].requires or [] if env_ok(Requirement(r))]
linked = 0
for n in sorted(link):
    dist = dists[n]
    tops = {str(f).split("/")[0] for f in dist.files or []} - {"..", "__pycache__"}
    for top in tops:
        if top.endswith(".pth") or not os.path.exists(os.path.join(src, top)):
            continue
        if not os.path.lexists(os.path.join(dst, top)):
            os.symlink(os.path.join(src, top), os.path.join(dst, top))
            linked += 1
print(f"stand-in image: {len(allowed & set(dists))} of the image's {len(allowed)} packages linked "
      f"({linked} entries; absent from the development venv: {len(allowed - set(dists))}), plus what this venv's "
      f"versions of them need beyond the list: {', '.join(sorted(extra)) or 'nothing'}")
EOF
# the calls, with multiprocess's py311 wheel in place of its py312 one
py311=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: -d "$py311" multiprocess==0.70.19 2>/dev/null
for c in c1 c2; do cp -r .gpu23/$c "$sim/$c"; done
mp312=$(cd "$sim/c2/wheels" && ls multiprocess-*py312*.whl)
mp311=$(cd "$py311" && ls multiprocess-*py311*.whl)
rm "$sim/c2/wheels/$mp312" && cp "$py311/$mp311" "$sim/c2/wheels/"
for c in c1 c2; do
  sed -i "s#wheels/$mp312#wheels/$mp311#" "$sim/$c/MANIFEST"
  grep -v "wheels/$mp312" "$sim/$c/SHA256SUMS" > "$sim/$c/S" && (cd "$sim/c2" && sha256sum "wheels/$mp311") >> "$sim/$c/S"
  mv "$sim/$c/S" "$sim/$c/SHA256SUMS"
done
rm -rf "$py311"

unshare -m -n bash -s "$repo" "$sim" <<'EOF'
set -uo pipefail
repo=$1 sim=$2
mount --make-rprivate /
mount --bind "$sim/tmp" /tmp
export PATH=$sim/venv/bin:$PATH HOME=/tmp/home && mkdir -p $HOME
unset SUPERNET_DATA SUPERNET_CACHE PYTHONPATH
cd "$repo"
python3 -c "import urllib.request as u; u.urlopen('https://pypi.org', timeout=5)" 2>/dev/null &&
  { echo "network reachable: not a rehearsal"; exit 1; } || echo "network: unreachable (as on the GPU machine)"
echo "--- call 1 (c1 only)"
mount --bind "$sim/c1" .gpu23/c1 && mount --bind "$sim/empty" .gpu23/c2
source benchmarks/gpu/e2e_setup.sh
echo "--- call 2 (c2 only)"
umount .gpu23/c1 .gpu23/c2 && mount --bind "$sim/empty" .gpu23/c1 && mount --bind "$sim/c2" .gpu23/c2
source benchmarks/gpu/e2e_setup.sh
[ "$E2E_READY" = 1 ] || { echo "not ready after both calls"; exit 1; }
echo "--- the same setup sourced again (idempotent)"
source benchmarks/gpu/e2e_setup.sh
python3 benchmarks/gpu/e2e_wheels.py check /tmp/g23/wheels --installed
python3 -c "
import importlib.metadata as md, fla, gguf, lm_eval, datasets, supernet.cli.main, supernet.placement.cost
from lm_eval import simple_evaluate
print('imports ok:', ', '.join(f'{n} {md.version(n)} from {__import__(m).__file__.split(\"/site-packages/\")[0].split(\"/\")[-3:]}' for n, m in (('lm-eval', 'lm_eval'), ('datasets', 'datasets'), ('fla-core', 'fla'), ('gguf', 'gguf'))))
"
echo "--- convert the carried teacher and score two tasks offline"
t0=$(date +%s)
python3 -m supernet.cli.main convert smollm2 /tmp/ckpt --swa-window 512 2>&1 | tail -2
echo "convert: $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
python3 -m supernet.cli.main eval-tasks /tmp/ckpt --placement all-fa --tasks ruler_niah_2k,bb_general_knowledge \
  --limit 2 --out /tmp/tasks.json 2>&1 | tail -12
echo "eval-tasks: $(( $(date +%s) - t0 )) s"
python3 - <<'PY'
import json, os
r = json.load(open("/tmp/tasks.json"))
print({k: {m: v for m, v in r["results"][k].items() if m.startswith("acc")} for k in r["results"]})
c = os.environ["SUPERNET_CACHE"]
print("cache:", sorted(os.listdir(c)), "tasks:", sorted(os.listdir(f"{c}/tasks")))
PY
echo "--- eval-placements with task metrics (the pipeline's evaluate step, through lm-eval's evaluator)"
t0=$(date +%s)
python3 -m supernet.cli.main eval-placements /tmp/ckpt --data /tmp/data/pydocs-eval.jsonl --n 2 --seq-len 64 \
  --sequences 2 --batch-size 2 --retrieval ruler_niah_256 --dev-tasks bb_general_knowledge --task-limit 1 \
  --device cpu --out /tmp/ev.jsonl 2>&1 | tail -4
echo "eval-placements: $(( $(date +%s) - t0 )) s"
python3 -c "
import json
for line in open('/tmp/ev.jsonl'):
    r = json.loads(line); print({k: v for k, v in r.items() if k != 'placement'})
"
umount .gpu23/c1 .gpu23/c2
EOF
