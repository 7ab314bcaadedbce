# GPU e2e run of issue 23 (benchmarks/e2e.py, task set e2e), in calls while the machine stays warm:
#   call 1, carry .gpu23/c1:  bash benchmarks/gpu/run_e2e2.sh stash
#   call 2, carry .gpu23/c2:  WATCH=420 bash benchmarks/gpu/run_e2e2.sh start
#   later calls:              WATCH=55 bash benchmarks/gpu/run_e2e2.sh watch
# (pieces from benchmarks/gpu/e2e_bundle.sh). `start` installs (e2e_setup.sh), prints an import check
# and the requirement check of the carried wheels against the machine's installed versions, then starts
# e2e.py as a setsid daemon (it outlives the call while the machine is held) writing
# /tmp/e2e/console.log, and watches it WATCH seconds. `watch` waits up to WATCH x 10 s (less once the
# report exists or the daemon exits), then copies what there is to $OUT (at most 8 files come back):
# results.md, measurements.json, the two plots, console.txt, e2e-files.tgz (presets, costs,
# evaluations, log.txt, settings, the final checkpoint's config.json) and, once the report exists,
# triton_cache.tgz. Extra e2e.py arguments: E2E_ARGS="--distill-steps 800 ...". After a failure: fix,
# then `E2E_ARGS="--step NAME ..." bash benchmarks/gpu/run_e2e2.sh start` reruns from that step
# (each step resumes from the files the earlier ones left in /tmp/e2e).
mode=${1:?usage: run_e2e2.sh stash|start|watch}
source benchmarks/gpu/e2e_setup.sh
W=/tmp/e2e

console_tail() {  # the console without progress-bar redraws
  [ -f $W/console.log ] && tr '\r' '\n' < $W/console.log | grep -v -e "it/s\]$" -e "s/it\]$" | tail -"${1:-25}"
}
daemon_alive() { [ -f $W/pid ] && kill -0 "$(cat $W/pid)" 2>/dev/null; }

case "$mode" in
stash)
  ls /tmp/g23 | sed 's/^/  stashed: /'
  ;;
start)
  [ "$E2E_READY" = 1 ] || { echo "run_e2e2: not ready (pieces missing: $_e2e_missing): carry .gpu23/c1 and .gpu23/c2 first"; exit 1; }
  python3 - <<'EOF' || exit 1
import importlib.metadata as md
import torch
import fla, gguf, lm_eval, datasets, supernet.cli.main, supernet.placement.cost  # noqa: F401
from lm_eval import simple_evaluate  # noqa: F401
from lm_eval.tasks import TaskManager  # noqa: F401
names = ["torch", "triton", "transformers", "huggingface-hub", "fla-core", "gguf", "lm-eval", "datasets",
         "evaluate", "pyarrow", "fsspec", "pandas", "numpy"]
print("imports ok:", ", ".join(f"{n} {md.version(n)}" for n in names))
print("GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
EOF
  python3 benchmarks/gpu/e2e_wheels.py check /tmp/g23/wheels --installed || echo "run_e2e2: (version notes above; not fatal)"
  if daemon_alive; then
    echo "run_e2e2: the e2e daemon is already running (pid $(cat $W/pid)); watching it"
  else
    mkdir -p $W
    # shellcheck disable=SC2086  # E2E_ARGS is a list of words
    setsid nohup python3 benchmarks/e2e.py --teacher smollm2 --data-dir /tmp/data --workdir $W --task-set e2e \
      ${E2E_ARGS:-} >> $W/console.log 2>&1 < /dev/null &
    echo $! > $W/pid
    echo "run_e2e2: started e2e.py (pid $(cat $W/pid)) with: ${E2E_ARGS:-(defaults)}"
  fi
  for _ in $(seq $(( ${WATCH:-420} / 10 ))); do daemon_alive || break; sleep 10; done
  daemon_alive || echo "run_e2e2: the e2e daemon has exited"
  console_tail 30
  ;;
watch)
  for _ in $(seq "${WATCH:-50}"); do
    [ -f $W/results.md ] && break
    daemon_alive || { echo "run_e2e2: the e2e daemon has exited"; break; }
    sleep 10
  done
  console_tail 30
  grep -a -h -o "[a-z]* done.* in [0-9]*s" $W/console.log 2>/dev/null | sed 's/^/  step /'
  for f in results.md measurements.json speed_quality.png frontier.png; do [ -f $W/$f ] && cp $W/$f "$OUT"/; done
  tr '\r' '\n' < $W/console.log | grep -v -e "it/s\]$" -e "s/it\]$" > "$OUT"/console.txt
  (cd $W && cp -f supernet-final/config.json supernet-final-config.json 2>/dev/null
   tar czf "$OUT"/e2e-files.tgz $(ls presets.json presets-constrained.json costs.json evaluations.jsonl log.txt \
     settings.json surrogate.json surrogates.json speculative.json supernet-final-config.json measurements.json \
     results.md transfer/metrics.jsonl distill/metrics.jsonl 2>/dev/null))
  if [ -f $W/results.md ]; then
    bash benchmarks/gpu/pack_triton_cache.sh
    # a file over 16 MiB does not come back: then only the autotuning results
    if [ "$(stat -c %s "$OUT"/triton_cache.tgz)" -gt $((15 * 1024 * 1024)) ]; then
      (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' -print0 | tar czf "$OUT"/triton_cache.tgz --null -T -)
    fi
  fi
  ls -la "$OUT"
  ;;
*)
  echo "usage: run_e2e2.sh stash|start|watch"; exit 2
  ;;
esac
