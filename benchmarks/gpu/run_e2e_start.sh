# GPU e2e, call 2 (after a call that carried .teacher/a): join the teacher, start the pipeline as a
# daemon (it outlives this call while the machine is held), then watch it for a while.
source benchmarks/gpu/setup.sh
mkdir -p /tmp/e2e
setsid nohup python3 benchmarks/e2e.py --teacher smollm2 --data-dir .data --workdir /tmp/e2e \
  --distill-steps ${DISTILL_STEPS:-800} > /tmp/e2e/console.log 2>&1 < /dev/null &
sleep ${WATCH:-420}
tr '\r' '\n' < /tmp/e2e/console.log | grep -v "it/s\]$" | tail -25
