# Pack Triton's cache into $OUT/triton_cache.tgz for the next session: the whole cache when it is
# under 48 MB, else only the autotuning results (*.autotune.json, a few KB). Here, afterwards:
#   mkdir -p .cache/triton && tar xzf <files_at>/triton_cache.tgz -C .cache/triton
# and carry .cache/triton (git-ignored). Keys hold the Triton version, the GPU architecture (sm_90 for
# H100 and H200 alike) and the kernel source, so a stale entry is simply not used.
TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
cache_mb=$(du -sm "$TRITON_CACHE_DIR" | cut -f1)
if [ "$cache_mb" -le 48 ]; then
  tar czf "$OUT/triton_cache.tgz" -C "$TRITON_CACHE_DIR" .
else
  (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' -print0 | tar czf "$OUT/triton_cache.tgz" --null -T -)
fi
echo "Triton cache ${cache_mb} MB -> $OUT/triton_cache.tgz ($(du -h "$OUT/triton_cache.tgz" | cut -f1))"
