# GPU e2e, later calls: wait while the daemon works (up to WATCH x 10 s; it stops waiting as soon as
# the results table exists or the daemon has exited, e.g. on an error), then copy what it has
# written to $OUT. After a failure: fix, then rerun the failed step and those after it with
# `python3 benchmarks/e2e.py --data-dir /tmp/data --workdir /tmp/e2e --step NAME ...` (each step
# resumes from the files the earlier ones left).
for i in $(seq ${WATCH:-50}); do
  [ -f /tmp/e2e/results.md ] && break
  kill -0 "$(cat /tmp/e2e/pid)" 2>/dev/null || { echo "the e2e daemon has exited"; break; }
  sleep 10
done
tr '\r' '\n' < /tmp/e2e/console.log | grep -v "it/s\]$" | tail -30
# at most a handful of files come back from a call: the results first
for f in measurements.json results.md speed_quality.png frontier.png presets.json costs.json evaluations.jsonl; do
  [ -f /tmp/e2e/$f ] && cp /tmp/e2e/$f $OUT/
done
tr '\r' '\n' < /tmp/e2e/console.log | grep -v "it/s\]$" > $OUT/console.txt
ls -la $OUT
