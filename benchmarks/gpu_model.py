"""GPU check and timing of the attention mixers and of the whole model (issue 2).

1. Correctness: each mixer's CUDA path (bf16) against its CPU path (float32), fresh random inputs,
   relative error ||out - ref|| / ||ref||, prefill and token-by-token decode.
2. Per-layer timing, SmolLM2 shapes (hidden 576, 9 q heads / 3 kv heads of 64): prefill and one
   decode step at context 2k/8k/32k, batch 1 and 64, for our mixer layer (projections included),
   our kernel wrapper alone, and the raw kernel (SDPA / FlexAttention / flash-attn) on the same shapes.
3. Whole model: the all-fa supernet forward against HF's Llama with the same weights.

Usage: python benchmarks/gpu_model.py [--smoke] [--out FILE]   (--smoke: tiny shapes, runs on CPU)
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, write_results  # noqa: E402
from supernet.cache import SupernetCache  # noqa: E402
from supernet.config import SupernetConfig  # noqa: E402
from supernet.measure.linear_mixers import rel_err  # noqa: E402
from supernet.measure.shapes import smollm2_config  # noqa: E402
from supernet.measure.timer import median_seconds  # noqa: E402
from supernet.mixers import mixer_class, spec  # noqa: E402
from supernet.mixers.rotary import RotaryEmbedding  # noqa: E402
from supernet.ops.attention import causal_attention  # noqa: E402


def check_correctness(config: SupernetConfig, device: str, mixers: list[str]) -> list[dict]:
    """CUDA bf16 vs CPU fp32, prefill of T tokens then 4 decode steps, fresh random inputs per check."""
    rows = []
    for name in mixers:
        for t in (100, 700):
            torch.manual_seed(1000 + t + len(name))
            mixer = mixer_class(name)(config, 0).float().eval()
            x = torch.randn(2, t + 4, config.hidden_size) * 0.5
            rope = RotaryEmbedding(config)
            pos = torch.arange(t + 4)[None].expand(2, -1)
            with torch.no_grad():
                cos, sin = rope(x, pos)
                ref = mixer(x, (cos, sin))
                gpu = mixer_class(name)(config, 0).to(device, torch.bfloat16).eval()
                gpu.load_state_dict({k: v.to(torch.bfloat16) for k, v in mixer.state_dict().items()})
                xg = x.to(device, torch.bfloat16)
                cg, sg = rope(xg, pos.to(device))
                prefill = gpu(xg, (cg, sg))
                cache = SupernetCache(1)
                outs = [gpu(xg[:, :t], (cg[:, :t], sg[:, :t]), cache)]
                cache.advance(t)
                for i in range(t, t + 4):
                    outs.append(gpu(xg[:, i : i + 1], (cg[:, i : i + 1], sg[:, i : i + 1]), cache))
                    cache.advance(1)
                decode = torch.cat(outs, dim=1)
            rows.append({"mixer": name, "T": t, "prefill_rel_err": rel_err(prefill, ref),
                         "decode_rel_err": rel_err(decode, ref)})
            del gpu, mixer
    return rows


def raw_attention(q, k, v, window):
    """The bare kernel on pre-made [B, H, T, D] tensors: what our wrapper adds is measured against this."""
    return lambda: causal_attention(q, k, v, scale=q.shape[-1] ** -0.5, window=window)


def time_layers(config, device, contexts, batches, mixers, repeat) -> list[dict]:
    rows = []
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rope = RotaryEmbedding(config).to(device)
    for name in mixers:
        mixer = mixer_class(name)(config, 0).to(device, dtype).eval()
        for ctx in contexts:
            for b in batches:
                row = {"mixer": name, "context": ctx, "batch": b}
                try:
                    with torch.no_grad():
                        x = torch.randn(b, ctx, config.hidden_size, device=device, dtype=dtype)
                        pos = torch.arange(ctx, device=device)[None].expand(b, -1)
                        cos, sin = rope(x, pos)
                        row["prefill_ms"] = 1e3 * median_seconds(lambda: mixer(x, (cos, sin)), repeat=repeat)
                        row.update(_raw_timings(name, mixer, x, cos, sin, repeat))
                        row.update(_decode_timing(name, mixer, x, cos, sin, rope, repeat))
                except torch.OutOfMemoryError:
                    row["note"] = "out of memory"
                rows.append(row)
                x = cos = sin = None
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def _raw_timings(name, mixer, x, cos, sin, repeat) -> dict:
    if spec(name).family != "attention":
        return {}
    b, t, _ = x.shape
    h, kv, d = mixer.num_heads, mixer.num_kv_heads, mixer.head_dim
    q = torch.randn(b, h, t, d, device=x.device, dtype=x.dtype)
    k = torch.randn(b, kv, t, d, device=x.device, dtype=x.dtype)
    v = torch.randn_like(k)
    kernel = 1e3 * median_seconds(raw_attention(q, k, v, mixer.window), repeat=repeat)
    proj = 1e3 * median_seconds(lambda: (mixer.q_proj(x), mixer.k_proj(x), mixer.v_proj(x),
                                  mixer.o_proj(torch.empty(b, t, h * d, device=x.device, dtype=x.dtype))),
                         repeat=repeat)
    return {"raw_kernel_prefill_ms": kernel, "projections_ms": proj}


def _decode_timing(name, mixer, x, cos, sin, rope, repeat) -> dict:
    b, t, _ = x.shape
    cache = SupernetCache(1)
    mixer(x, (cos, sin), cache)
    cache.advance(t)
    state = cache.mixer_state(0, name)
    snapshot = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    x1 = x[:, -1:].contiguous()
    pos = torch.full((b, 1), t, device=x.device)
    c1, s1 = rope(x1, pos)

    def step():
        mixer(x1, (c1, s1), cache)
        state.update(snapshot)  # keep the context length fixed across repeats

    out = {"decode_ms": 1e3 * median_seconds(step, repeat=repeat)}
    if spec(name).family == "attention":
        keys = state["k"][:, :, : min(t, state["k"].shape[2])]
        vals = state["v"][:, :, : keys.shape[2]]
        q = torch.randn(b, mixer.num_heads, 1, mixer.head_dim, device=x.device, dtype=x.dtype)
        out["raw_kernel_decode_ms"] = 1e3 * median_seconds(raw_attention(q, keys, vals, None), repeat=repeat)
    return out


def time_whole_model(device: str, batch: int, seq: int, repeat: int, smoke: bool) -> dict:
    """All-fa supernet forward vs HF LlamaForCausalLM forward, same weights and shapes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from supernet.convert import supernet_from_teacher

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kw = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
              num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
              tie_word_embeddings=True, max_position_embeddings=8192)
    if smoke:
        kw.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    teacher = LlamaForCausalLM(LlamaConfig(**kw, attn_implementation="sdpa")).to(device, dtype).eval()
    supernet = supernet_from_teacher(teacher).to(device, dtype).eval()
    ids = torch.randint(0, kw["vocab_size"], (batch, seq), device=device)
    with torch.no_grad():
        diff = (teacher(ids).logits.float() - supernet(ids, use_cache=False).logits.float()).abs().max().item()
        t_hf = median_seconds(lambda: teacher(ids, use_cache=False), repeat=repeat)
        t_ours = median_seconds(lambda: supernet(ids, use_cache=False), repeat=repeat)
        t_hf2 = median_seconds(lambda: teacher(ids, use_cache=False), repeat=repeat)
    return {"batch": batch, "seq": seq, "hf_llama_ms": 1e3 * min(t_hf, t_hf2), "supernet_all_fa_ms": 1e3 * t_ours,
            "ratio": t_ours / min(t_hf, t_hf2), "max_abs_logit_diff_bf16": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (runs on the CPU)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--mixers", default="fa,swa")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mixers = args.mixers.split(",")
    if args.smoke:
        config = smollm2_config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, swa_window=64)
        contexts, batches, repeat = [128, 256], [1, 2], 3
    else:
        config = smollm2_config()
        contexts, batches, repeat = [2048, 8192, 32768], [1, 64], 10
    correctness = check_correctness(config, device, mixers) if device == "cuda" or args.smoke else []
    print_table(correctness, ["mixer", "T", "prefill_rel_err", "decode_rel_err"], "CUDA bf16 vs CPU fp32")
    layers = time_layers(config, device, contexts, batches, mixers, repeat)
    print_table(layers, ["mixer", "context", "batch", "prefill_ms", "raw_kernel_prefill_ms", "projections_ms",
                         "decode_ms", "raw_kernel_decode_ms", "note"], "per-layer timing (ms, median)")
    model = time_whole_model(device, 2 if args.smoke else 8, 64 if args.smoke else 2048, repeat, args.smoke)
    print_table([model], list(model), "whole model forward: all-fa supernet vs HF Llama")
    write_results("gpu_model" if not args.smoke else "gpu_model_smoke",
                  {"correctness": correctness, "layers": layers, "whole_model": model}, args.out)


if __name__ == "__main__":
    main()
