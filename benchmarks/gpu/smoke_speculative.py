"""CUDA smoke check of the graphed engines: speculative (and static) greedy output equals eager decoding.

Tiny random supernet (serving's, layers 2-3 turned down as in tests/test_speculative.py) on the GPU,
float32 and bfloat16, CUDA graphs on; prints one line per case and exits non-zero if a float32 case
differs (bfloat16 cases are reported: ties within bf16 rounding can flip a greedy token).

    python benchmarks/gpu/smoke_speculative.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from supernet.generation import greedy_generate, speculative_generate  # noqa: E402
from supernet.model import SupernetForCausalLM  # noqa: E402
from supernet.serving.testing import random_state_dict, tiny_config  # noqa: E402

PAIRS = [("fa,swa,kda,gdn", "fa,swa,gdn,kda"), ("swa,fa,gdn,kda", "swa,fa,kda,gdn"), ("swa,swa,swa,swa", "fa,fa,fa,fa")]


def model_on(device: str, dtype: torch.dtype) -> SupernetForCausalLM:
    config = tiny_config(vocab_size=264)
    state = random_state_dict(config, seed=1)
    for name in state:
        if name.startswith(("model.layers.2.mixers", "model.layers.3.mixers")) and name.endswith("o_proj.weight"):
            state[name] = state[name] * 0.35
    model = SupernetForCausalLM(config).eval()
    model.load_state_dict(state, strict=False)
    return model.to(device=device, dtype=dtype)


def main() -> int:
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    failures = 0
    import os

    dtypes = [getattr(torch, n) for n in os.environ.get("SMOKE_DTYPES", "float32,bfloat16").split(",")]
    for dtype in dtypes:
        model = model_on("cuda", dtype)
        for batch, prompt_len, k in [(1, 12, 3), (8, 12, 3), (8, 5, 1), (8, 5, 5), (16, 40, 4)]:
            ids = torch.randint(3, 200, (batch, prompt_len), generator=torch.Generator().manual_seed(batch + k)).cuda()
            for draft, target in PAIRS:
                eager = greedy_generate(model, ids, target, 20, static=False)
                static = greedy_generate(model, ids, target, 20, static=True, cuda_graph=True)
                t0 = time.perf_counter()
                got, stats = speculative_generate(model, ids, draft, target, k=k, max_new_tokens=20, cuda_graph=True)
                wall = time.perf_counter() - t0
                same = sum(a == b for a, b in zip(got, eager))
                ok = got == eager and static == eager
                failures += (not ok) and dtype == torch.float32
                print(f"{str(dtype)[6:]:8s} b={batch:2d} T={prompt_len:2d} k={k} {draft:>16s} -> {target:16s} "
                      f"spec==eager rows {same}/{batch}, static==eager {static == eager}, acc {stats.acceptance_rate:.2f}, "
                      f"ragged {stats.ragged_rounds}, decode {stats.decode_seconds * 1e3:.0f} ms (wall {wall * 1e3:.0f})"
                      f"{'' if ok else '  <-- DIFFERS'}", flush=True)
        # sampling runs and stays in the vocabulary
        ids = torch.randint(3, 200, (8, 12), generator=torch.Generator().manual_seed(7)).cuda()
        gen = torch.Generator(device="cuda").manual_seed(0)
        rows, _ = speculative_generate(model, ids, *PAIRS[0], k=3, max_new_tokens=16, temperature=1.0, generator=gen)
        print(f"{dtype} sampling: {len(rows)} rows of {[len(r) for r in rows]} tokens, max id {max(map(max, rows))}")
    print("FAILURES (float32):", failures, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
