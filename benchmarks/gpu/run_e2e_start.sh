# Superseded for runs with benchmark tasks (issue 23) by run_e2e2.sh (stash|start|watch with the pieces of
# e2e_bundle.sh: lm-eval and its dependencies, BIG-bench task files). Note that setup.sh's
# PYTHONPATH=$PWD alone no longer imports supernet.cli / supernet.placement (those map to the top-level
# folders through the editable install, which e2e_setup.sh does).
# GPU e2e, call 2 (after a call that carried .teacher/a; this one carries .teacher/b and .data): join
# the teacher, copy the data to /tmp/data (later calls carry nothing, and the working tree's ignored
# folders are not there then), start the pipeline as a daemon (it outlives this call while the
# machine is held), then watch it for a while. Its pid is in /tmp/e2e/pid for run_e2e_watch.sh.
source benchmarks/gpu/setup.sh
mkdir -p /tmp/e2e /tmp/data
cp .data/*.jsonl /tmp/data/
setsid nohup python3 benchmarks/e2e.py --teacher smollm2 --data-dir /tmp/data --workdir /tmp/e2e \
  --distill-steps ${DISTILL_STEPS:-800} > /tmp/e2e/console.log 2>&1 < /dev/null &
echo $! > /tmp/e2e/pid
sleep ${WATCH:-420}
tr '\r' '\n' < /tmp/e2e/console.log | grep -v "it/s\]$" | tail -25
