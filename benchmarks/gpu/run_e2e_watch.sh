# GPU e2e, later calls: wait while the daemon works, then copy what it has written to $OUT.
for i in $(seq ${WATCH:-50}); do
  [ -f /tmp/e2e/results.md ] && break
  sleep 10
done
tr '\r' '\n' < /tmp/e2e/console.log | grep -v "it/s\]$" | tail -30
for f in measurements.json results.md speed_quality.png frontier.png presets.json costs.json evaluations.jsonl log.txt; do
  [ -f /tmp/e2e/$f ] && cp /tmp/e2e/$f $OUT/
done
tr '\r' '\n' < /tmp/e2e/console.log | grep -v "it/s\]$" > $OUT/console.txt
ls -la $OUT
bash benchmarks/gpu/pack_triton_cache.sh
