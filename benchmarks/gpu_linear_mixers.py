"""GPU check and timing of the linear mixers, Gated DeltaNet (gdn) and Kimi Delta Attention (kda).

1. Correctness, relative error ||out - ref|| / ||ref|| with fresh random inputs per check:
   - the fused pieces on the device (bf16, < 1e-2): fla's short conv (prefill, prefill from a tail,
     the in-place decode update) and gated RMSNorm against our torch paths on the same GPU, and
     the delta rule with the gates computed inside fla's kernels (raw gate input + A_log, dt_bias,
     beta logits) against the same kernels fed precomputed gates (chunk and fused recurrent);
   - each mixer's CUDA path (fla's Triton kernels, bf16) against its CPU torch path (float32) with
     the same weights (< 1e-2): prefill through the chunk kernel (T=300) and the fused recurrent
     kernel (T=40), prefill + token-by-token decode with the cache, decode steps replayed as a CUDA
     graph against the same steps run eagerly, and a training step (outputs and gradients). Plus the
     raw ops in float32 against the torch ops (argument conventions, < 1e-3).
2. Timing per layer (median of triton's do_bench): prefill (with a fresh decode cache) and one
   decode step, for our whole mixer layer (projections, convs, gates, kernel, norm, o_proj) and
   for the raw fla op alone on the same shapes (precomputed gates). Decode is timed eagerly and as a
   CUDA graph replay (the layer's one-token step captured with its static cache, as
   supernet/static_decode.py serves; the raw op captured alike): eager decode is launch-bound.
   Each layer time is also taken with the fused paths off (SUPERNET_FUSED_KERNELS=0: torch conv,
   norm and gates, the layer as it was before them), in the same run on the same device.
   Second reference: fla's own complete layer (fla.layers.GatedDeltaNet / KimiDeltaAttention) with
   the same shapes (`fla_layer_kwargs`) and our mixer's weights, timed alike on the same input
   (fla_layer_ms, layer_over_fla_layer; decode eager only, through fla's Cache); built once per
   (shape, mixer) and cross-checked against ours (fla_layer_rel_err). The raw op is a floor no layer
   with seven projection GEMMs reaches; fla's layer does the same work as ours. A failure there is
   recorded in the row (fla_layer_error), not as an item error. Not on the CPU (--smoke).
   - SmolLM2 layer (hidden 576, 9 heads x 64): prefill batch 1 at 2k/8k/32k tokens and batch 64 at
     2k/8k (then 64 x 32k and batch 8 if time is left); decode batch 1 and 64 at context 2k/8k/32k.
   - FACTS.md's shape (16 heads x 128, hidden 2048): prefill batch 4 at 2k, decode batch 64 at
     4k/32k (then prefill batch 4 at 8k/32k), to compare with FACTS.md (GDN 0.59/1.24/4.29 ms,
     KDA 0.74/2.29/8.86 ms for prefill batch 4 at 2k/8k/32k).
   A linear mixer's decode state has the same size at every context, so the decode cases start
   from a synthetic state (random conv tails and recurrent matrix) instead of a real prefill; the
   context column is a label that shows the cost does not depend on it.
3. Kernel breakdown (torch.profiler) of one SmolLM2 prefill (batch 1, 2048 tokens) and one eager
   decode step (batch 1 and 64), layer, raw op and layer with the fused paths off: kernels per call,
   GPU kernel time per call, wall
   time per call, and the top kernels by time, so the gap between layer and op can be attributed.

Robustness (the first run of every new kernel shape pays Triton compilation and fla's autotuning,
tens of seconds each, so a time-boxed run may not finish):
  - the work is a list of items run in order of importance: (a) checks of the fused pieces and of
    inference (prefill, decode with the cache, graphed decode) for gdn and kda on the SmolLM2 shape,
    which also compile and autotune the forward kernels the timings reuse; (b) the required
    timings: SmolLM2 prefill batch 1 and 64, decode batch 1 and 64, the kernel breakdown, then the
    FACTS shape's decode batch 64 and prefill batch 4 at 2k; (c) the rest: SmolLM2 prefill 64 x 32k
    and batch 8, the training-step checks (backward kernels: a new set to compile), the fp32 raw-op
    checks (another dtype and head count, so a new set too), FACTS prefill at 8k/32k;
  - within a mixer the rows share kernel shapes (fla's autotune keys hold heads and head size,
    not batch or length; its gated norm also keys on the row count in buckets of 65536 rows), so
    mostly only the first row of each group pays the autotuning;
  - after every check row and every timing row the output JSON is rewritten (atomically) with all
    done so far and "complete": false; "complete": true once every item ran or was skipped;
  - --time-limit: no new item starts after that many seconds; the rest are recorded under
    "skipped" with reason "skipped (time limit)". An item that raises is recorded under "errors"
    and the run goes on.

Usage: python benchmarks/gpu_linear_mixers.py [--out FILE] [--time-limit S] [--only-smollm2] [--smoke]
  --smoke: tiny shapes on the CPU (the "device path" is then the torch path in bf16, decode is not
  graphed, the breakdown lists CPU ops); for testing the script itself.
  benchmarks/gpu/run_linear.sh runs it on a GPU machine.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, device_name, print_table, time_fn  # noqa: E402
from supernet.cache import SupernetCache  # noqa: E402
from supernet.config import SupernetConfig  # noqa: E402
from supernet.mixers.gdn import GatedDeltaNetMixer  # noqa: E402
from supernet.mixers.kda import KimiDeltaAttentionMixer  # noqa: E402
from supernet.ops import delta_rule, gated_norm, short_conv  # noqa: E402
from supernet.ops.fla_backend import ENV_SWITCH, fused_kernels  # noqa: E402
from supernet.static_decode import GraphedStep  # noqa: E402

MIXERS = {"gdn": GatedDeltaNetMixer, "kda": KimiDeltaAttentionMixer}
OUTPUT_TOL = 1e-2
GRAD_TOL = 5e-2  # bf16 gradients through a few hundred steps of recurrence
OP_TOL = 1e-3  # float32 kernels vs float32 torch
BENCH_WARMUP_MS, BENCH_REP_MS = 5, 20  # do_bench budgets; the median of >= a few calls either way
SKIPPED_TIME = "skipped (time limit)"

# Per shape: "prefill" [(batch, tokens)] and "decode" [(batch, context)] are section (b), run before
# everything but the checks; "extra_prefill" goes to section (c). "profile": the kernel breakdown
# (prefill (batch, tokens) and decode batches) of the main shape, in section (b).
FULL = {
    "shapes": {
        "smollm2": dict(hidden=576, heads=9, head_dim=64,
                        prefill=[(1, 2048), (1, 8192), (1, 32768), (64, 2048), (64, 8192)],
                        decode=[(b, c) for b in (1, 64) for c in (2048, 8192, 32768)],
                        extra_prefill=[(64, 32768), (8, 2048), (8, 8192), (8, 32768)]),
        "facts-16x128": dict(hidden=2048, heads=16, head_dim=128,
                             prefill=[(4, 2048)], decode=[(64, 4096), (64, 32768)],
                             extra_prefill=[(4, 8192), (4, 32768)]),
    },
    "main_shape": "smollm2",
    "profile": dict(prefill=(1, 2048), decode_batches=(1, 64)),
}
SMOKE = {
    "shapes": {
        "tiny": dict(hidden=64, heads=2, head_dim=32, prefill=[(1, 64), (1, 130), (4, 64)],
                     decode=[(1, 64), (4, 130)], extra_prefill=[(2, 130)]),
        "tiny-wide": dict(hidden=64, heads=1, head_dim=64, prefill=[(2, 64)], decode=[(4, 130)],
                          extra_prefill=[(2, 130)]),
    },
    "main_shape": "tiny",
    "profile": dict(prefill=(1, 64), decode_batches=(1, 4)),
}
PROFILE_ITERS = 3  # calls per profiled case (the breakdown is per call)
PROFILE_TOP = 15  # kernels listed per case


# ---------------------------------------------------------------------------------- helpers


def linear_config(hidden: int, heads: int, head_dim: int) -> SupernetConfig:
    return SupernetConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=1,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim,
        max_position_embeddings=65536,
    )


@torch.no_grad()
def random_mixer(kind: str, config: SupernetConfig, seed: int) -> torch.nn.Module:
    """A float32 CPU mixer whose every parameter matters: O(1) projections, varied decays and gates."""
    torch.manual_seed(seed)
    mixer = MIXERS[kind](config, 0)
    for module in mixer.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=module.in_features**-0.5)
        elif isinstance(module, torch.nn.Conv1d):
            torch.nn.init.normal_(module.weight, std=0.5)
    mixer.A_log.add_(torch.randn_like(mixer.A_log) * 0.5)
    mixer.o_norm.weight.add_(torch.randn_like(mixer.o_norm.weight) * 0.1)
    return mixer.eval()


def on_device(mixer: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    return copy.deepcopy(mixer).to(device=device, dtype=dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def bench_ms(fn: Callable[[], Any], device: str) -> float:
    """Median milliseconds per call: triton's do_bench on CUDA, perf_counter on CPU."""
    if device == "cuda":
        import triton.testing

        fn()  # compile / autotune outside the measurement
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS, return_mode="median"))
    return time_fn(fn, warmup=1, repeat=3) * 1e3


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def fla_ops(device: str) -> dict[str, Callable]:
    """The raw kernels our dispatch calls: fla's on CUDA, our torch dispatch in smoke mode."""
    if device == "cuda":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
        from fla.ops.kda import chunk_kda, fused_recurrent_kda

        return {"gdn_chunk": chunk_gated_delta_rule, "gdn_recurrent": fused_recurrent_gated_delta_rule,
                "kda_chunk": chunk_kda, "kda_recurrent": fused_recurrent_kda}
    return {"gdn_chunk": delta_rule.gated_delta_rule, "gdn_recurrent": delta_rule.gated_delta_rule,
            "kda_chunk": delta_rule.kda_rule, "kda_recurrent": delta_rule.kda_rule}


def op_inputs(kind: str, B: int, T: int, H: int, K: int, device: str, dtype: torch.dtype, seed: int,
              state: bool = False) -> dict[str, Any]:
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    g_shape = (B, T, H, K) if kind == "kda" else (B, T, H)
    inputs = dict(
        q=rnd(B, T, H, K).to(device, dtype), k=rnd(B, T, H, K).to(device, dtype), v=rnd(B, T, H, K).to(device, dtype),
        g=(F.logsigmoid(rnd(*g_shape)) * 0.2).to(device), beta=torch.sigmoid(rnd(B, T, H)).to(device),
    )
    if state:
        inputs["initial_state"] = (rnd(B, H, K, K) * 0.1).to(device)
    return inputs


def call_op(op: Callable, inputs: dict[str, Any], K: int, device: str) -> Any:
    kwargs = dict(scale=K**-0.5, output_final_state=True)
    if device == "cuda":
        kwargs["use_qk_l2norm_in_kernel"] = True
    else:
        kwargs["use_qk_l2norm"] = True
    return op(**inputs, **kwargs)


# ---------------------------------------------------------------------------------- fla's own layer

# The second timing reference: fla's complete layer (fla.layers, 0.6.0) with our shapes. The raw op
# is a lower bound no layer with seven projection GEMMs can reach; fla's layer does the same work.
FLA_LAYER_CLASSES = {"gdn": "GatedDeltaNet", "kda": "KimiDeltaAttention"}
FLA_LAYER_OFF_CUDA = "not timed: fla's layers run only through Triton on CUDA"
FLA_CHECK_TOKENS = 64  # the cross-check's length: fused recurrent kernel in both layers, no chunk autotuning


def linear_dims(mixer: str, config: SupernetConfig) -> tuple[int, int, int, int]:
    """(q/k heads, v heads, key head dim, value head dim) of our mixer `mixer` under `config`."""
    if mixer == "gdn":
        return config.gdn_num_heads, config.gdn_num_v_heads, config.gdn_head_dim, config.gdn_v_head_dim
    if mixer == "kda":
        return config.kda_num_heads, config.kda_num_heads, config.kda_head_dim, config.kda_v_head_dim
    raise ValueError(f"no fla layer for mixer {mixer!r} (known: {', '.join(FLA_LAYER_CLASSES)})")


def fla_layer_kwargs(shape: dict, mixer: str, config: SupernetConfig) -> dict[str, Any]:
    """Constructor arguments of fla's own layer (fla.layers.GatedDeltaNet / KimiDeltaAttention) that
    reproduce our mixer built from `config` on the timing shape `shape` (hidden, heads, head_dim).

    mode "chunk": like our dispatch, fla's layer itself switches to the fused recurrent kernel for
    <= 64 tokens in inference, so one layer serves the prefill rows (chunk) and decode (fused recurrent).
    """
    H, HV, K, V = linear_dims(mixer, config)
    D = config.hidden_size
    if (D, H, K) != (shape["hidden"], shape["heads"], shape["head_dim"]):
        raise ValueError(f"config (hidden {D}, {mixer} heads {H} x {K}) does not match the shape "
                         f"(hidden {shape['hidden']}, heads {shape['heads']} x {shape['head_dim']})")
    kwargs: dict[str, Any] = dict(
        hidden_size=D, head_dim=K, expand_v=V // K if V % K == 0 else V / K, num_heads=H, num_v_heads=HV,
        mode="chunk", use_short_conv=True, conv_size=config.linear_conv_size, conv_bias=False,
        allow_neg_eigval=False, layer_idx=0, norm_eps=config.linear_norm_eps,
    )
    if mixer == "gdn":
        kwargs.update(use_gate=True, output_gate_activation="silu")  # our o_norm: silu gate
    else:
        kwargs.update(safe_gate=False, lower_bound=None)  # what our dispatch runs (fla's defaults)
    return kwargs


def fla_layer_differences(mixer: str, config: SupernetConfig) -> list[str]:
    """What fla's layer built from `fla_layer_kwargs` does differently from our mixer (for the JSON)."""
    H, HV, K, V = linear_dims(mixer, config)
    out = [
        "fla's layer runs the kernels with state_v_first=True (recurrent state [B, HV, V, K]); our dispatch "
        "and the raw-op timing use fla's default K-first state [B, HV, K, V]: the same kernels, another "
        "Triton specialization (compiled at the layer's first call, outside the timing)",
        "fla's layer goes through its Python Cache (fla.models.utils.Cache) and unpad/repad helpers "
        "(no-ops without a mask); ours through SupernetCache",
    ]
    if mixer == "gdn":
        out.append("with use_cache=False fla's GDN fuses the q/k/v convs into one call; it is timed with "
                   "use_cache=True and a fresh Cache (three convs, like ours with its fresh SupernetCache)")
    else:
        out.append(f"g_proj's second Linear ({V} -> {H * V}) has a bias in fla's KDA (ours has none): "
                   "one bias add more in fla's layer (loaded as zeros)")
        if K != V:
            out.append(f"low-rank gate projections: fla's f_proj rank is head_v_dim ({V}), ours head_dim ({K}): "
                       "different shapes, weights not transferable")
    return out


def fla_layer_state_dict(state: dict[str, torch.Tensor], mixer: str) -> dict[str, torch.Tensor]:
    """Our mixer's state dict under fla's layer's parameter names (KDA: g_proj's bias set to zero)."""
    if mixer == "gdn":
        return dict(state)
    names = {"f_a_proj.weight": "f_proj.0.weight", "f_b_proj.weight": "f_proj.1.weight",
             "g_a_proj.weight": "g_proj.0.weight", "g_b_proj.weight": "g_proj.1.weight"}
    out = {names.get(name, name): t for name, t in state.items()}
    g_b = state["g_b_proj.weight"]
    out["g_proj.1.bias"] = torch.zeros(g_b.shape[0], dtype=g_b.dtype, device=g_b.device)
    return out


def build_fla_layer(spec: dict, mixer: str, config: SupernetConfig, ours: torch.nn.Module | None = None,
                    device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """fla's layer with our shapes (and, given `ours`, our mixer's weights), in eval mode."""
    import fla.layers

    layer = getattr(fla.layers, FLA_LAYER_CLASSES[mixer])(**fla_layer_kwargs(spec, mixer, config))
    if ours is not None:
        with torch.no_grad():
            layer.load_state_dict(fla_layer_state_dict(ours.state_dict(), mixer), strict=True)
    return layer.to(device=device, dtype=dtype).eval()


def fla_cache() -> Any:
    from fla.models.utils import Cache

    return Cache()


def fla_decode_fn(layer: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """One decode step of fla's layer with its Cache, from a random state (as `synthetic_state`): one
    untimed step creates the state tensors in fla's layout, which are then filled with random values."""
    cache = fla_cache()
    layer(x, past_key_values=cache, use_cache=True)
    state = cache[0]
    recurrent = state["recurrent_state"]
    recurrent.copy_(torch.randn_like(recurrent) * 0.1)
    for conv in state["conv_state"]:
        conv.copy_(torch.randn_like(conv))
    return lambda: layer(x, past_key_values=cache, use_cache=True)


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1000]


# ---------------------------------------------------------------------------------- correctness

Emit = Callable[[dict], None]


def check_row(kind: str, check: str, err: float, tol: float, **extra: Any) -> dict[str, Any]:
    return {"mixer": kind, "check": check, "rel_err": err, "tol": tol, "ok": bool(err < tol), **extra}


def check_mixer_pair(kind: str, config: SupernetConfig, device: str, dtype: torch.dtype, seed: int):
    dev_mixer = on_device(random_mixer(kind, config, seed), device, dtype)
    # the reference computes in float32 with the very same (bf16-rounded) weights
    return dev_mixer, on_device(dev_mixer, "cpu", torch.float32)


def check_fused_ops(spec: dict, config: SupernetConfig, device: str, dtype: torch.dtype, seed: int,
                    emit: Emit) -> None:
    """The fused pieces our layers call on CUDA (fla's conv, gated norm, in-kernel gates) against the
    torch paths on the same device, bf16 inputs (in --smoke mode both sides are the torch path)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0, shift: float = 0.0, dt: torch.dtype = dtype) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device, dt)

    H, K, W = spec["heads"], spec["head_dim"], config.linear_conv_size
    C = H * K
    conv, torch_conv = short_conv.causal_conv1d_silu, short_conv.torch_causal_conv1d_silu
    w = rnd(C, 1, W, scale=0.5)
    w2 = w.squeeze(1)
    with torch.inference_mode():
        x = rnd(2, 300, C)
        path = "fla" if short_conv._use_fla(x, W) else "torch"
        y, tail = conv(x, w, None, True)
        y_ref, tail_ref = torch_conv(x, w2, None, True)
        # each row: the worse of the output's and the new tail's errors
        emit(check_row("conv", "prefill T=300", max(rel_err(y, y_ref), rel_err(tail, tail_ref)), OUTPUT_TOL, path=path))
        x = rnd(2, 37, C)
        y, tail = conv(x, w, tail, True)
        y_ref, tail_ref = torch_conv(x, w2, tail_ref, True)
        emit(check_row("conv", "prefill T=37 from a tail", max(rel_err(y, y_ref), rel_err(tail, tail_ref)),
                       OUTPUT_TOL, path=path))
        outs, refs, same_object = [], [], []
        for _ in range(3):
            x1 = rnd(2, 1, C)
            y, new_tail = conv(x1, w, tail, True)
            same_object.append(new_tail is tail)
            tail = new_tail
            y_ref, tail_ref = torch_conv(x1, w2, tail_ref, True)
            outs.append(y), refs.append(y_ref)
        # state_kept: the tail stayed the same tensor (fla's in-place update; what graph replay wants)
        err = max(rel_err(torch.cat(outs, 1), torch.cat(refs, 1)), rel_err(tail, tail_ref))
        emit(check_row("conv", "3 decode steps (in-place update)", err, OUTPUT_TOL, path=path,
                       state_kept=all(same_object)))
        foreign = tail_ref.clone()  # a tail this module did not make (e.g. a snapshot) is never modified
        y, _ = conv(x1, w, foreign, True)
        err = max(rel_err(y, torch_conv(x1, w2, tail_ref, True)[0]), rel_err(foreign, tail_ref))
        emit(check_row("conv", "decode from a contiguous tail (left untouched)", err, OUTPUT_TOL, path=path))

        x, gate, nw = rnd(2, 300, H, K), rnd(2, 300, H, K), rnd(K, scale=0.1, shift=1.0)
        for act in ("silu", "sigmoid"):
            out = gated_norm.gated_rms_norm(x, gate, nw, 1e-5, act)
            ref = gated_norm.torch_gated_rms_norm(x, gate, nw, 1e-5, act)
            emit(check_row("norm", f"gated rmsnorm ({act})", rel_err(out, ref), OUTPUT_TOL,
                           path="fla" if gated_norm._use_fla(x) else "torch"))

        for kind, rule in (("gdn", delta_rule.gated_delta_rule), ("kda", delta_rule.kda_rule)):
            for T in (300, 1):
                q, k, v = rnd(2, T, H, K), rnd(2, T, H, K), rnd(2, T, H, K)
                raw = rnd(2, T, H, K) if kind == "kda" else rnd(2, T, H)
                b = rnd(2, T, H)
                A_log = rnd(H, scale=0.5)
                dt_bias = rnd(H * K if kind == "kda" else H, shift=-3.0)
                h0 = rnd(2, H, K, K, scale=0.1, dt=torch.float32)
                common = dict(scale=K**-0.5, initial_state=h0, output_final_state=True, use_qk_l2norm=True)
                o, s = rule(q, k, v, raw, b, A_log=A_log, dt_bias=dt_bias, beta_logits=True, **common)
                g = delta_rule.gate_decay(raw, A_log, dt_bias)
                o_ref, s_ref = rule(q, k, v, g, torch.sigmoid(b.float()), **common)
                emit(check_row(kind, f"in-kernel gates T={T} ({'chunk' if T > 64 else 'fused recurrent'})",
                               max(rel_err(o, o_ref), rel_err(s, s_ref)), OUTPUT_TOL,
                               gates_in_kernel=delta_rule.dispatch._gates_in_kernel(q, (q,))))


def check_inference(kind: str, config: SupernetConfig, device: str, dtype: torch.dtype, seed: int,
                    emit: Emit) -> None:
    """Prefill (chunk and fused recurrent kernels), prefill with the cache, decode, final state."""
    D = config.hidden_size
    dev_mixer, ref_mixer = check_mixer_pair(kind, config, device, dtype, seed)

    # prefill without a cache: chunk kernel (T > 64) and fused recurrent kernel (T <= 64, no grad)
    for T, path in ((300, "chunk"), (40, "fused_recurrent")):
        torch.manual_seed(seed + T)
        x = torch.randn(2, T, D).to(dtype)
        with torch.inference_mode():
            out = dev_mixer(x.to(device))
            ref = ref_mixer(x.float())
        emit(check_row(kind, f"prefill T={T} ({path})", rel_err(out, ref), OUTPUT_TOL))

    # prefill 100 with the cache, then 4 decode steps; every step compared
    torch.manual_seed(seed + 1)
    x = torch.randn(2, 104, D).to(dtype)
    with torch.inference_mode():
        for mixer, xs, store in ((dev_mixer, x.to(device), "dev"), (ref_mixer, x.float(), "ref")):
            cache, outs = SupernetCache(1), []
            for a, b in ((0, 100), (100, 101), (101, 102), (102, 103), (103, 104)):
                outs.append(mixer(xs[:, a:b], cache=cache))
                cache.advance(b - a)
            if store == "dev":
                dev_outs, dev_state = outs, cache.mixer_state(0, kind)["recurrent"]
            else:
                ref_outs, ref_state = outs, cache.mixer_state(0, kind)["recurrent"]
    errs = [rel_err(o, r) for o, r in zip(dev_outs, ref_outs)]
    emit(check_row(kind, "prefill 100 with cache", errs[0], OUTPUT_TOL))
    decode_err = rel_err(torch.cat(dev_outs[1:], 1), torch.cat(ref_outs[1:], 1))
    emit(check_row(kind, "4 decode steps after it", decode_err, OUTPUT_TOL,
                   per_step=[round(e, 6) for e in errs[1:]]))
    emit(check_row(kind, "recurrent state after decode", rel_err(dev_state, ref_state), OUTPUT_TOL))

    # decode steps replayed as a CUDA graph with a static cache (how supernet/static_decode.py serves)
    # against the same steps run eagerly on a copy of the cache
    torch.manual_seed(seed + 3)
    x = torch.randn(2, 106, D).to(device, dtype)
    with torch.inference_mode():
        cache = SupernetCache(1)
        dev_mixer(x[:, :100], cache=cache)
        twin = cache.clone()
        eager = [dev_mixer(x[:, t:t + 1], cache=twin) for t in range(100, 106)]
        x_buf, out_buf = x[:, 100:101].clone(), torch.empty_like(eager[0])

        def step() -> None:
            out_buf.copy_(dev_mixer(x_buf, cache=cache))

        graphed = GraphedStep(step, cache, [(0, kind)], cuda_graph=device == "cuda")
        outs = []
        for t in range(100, 106):  # 2 eager warm-ups, the capture, 3 replays
            x_buf.copy_(x[:, t:t + 1])
            graphed()
            outs.append(out_buf.clone())
    states = {key: rel_err(cache.mixer_state(0, kind)[key], twin.mixer_state(0, kind)[key])
              for key in ("conv_q", "conv_k", "conv_v", "recurrent")}
    err = max(rel_err(torch.cat(outs, 1), torch.cat(eager, 1)), *states.values())
    emit(check_row(kind, "6 decode steps as a CUDA graph vs eager", err, OUTPUT_TOL, captured=graphed.graph is not None))


def check_train(kind: str, config: SupernetConfig, device: str, dtype: torch.dtype, seed: int,
                emit: Emit) -> None:
    """A training step: chunk kernel forward + backward (same weights as check_inference's)."""
    D = config.hidden_size
    dev_mixer, ref_mixer = check_mixer_pair(kind, config, device, dtype, seed)
    torch.manual_seed(seed + 2)
    x = torch.randn(2, 200, D).to(dtype)
    w = torch.randn(2, 200, D)
    grads = {}
    for name, mixer, xs in (("dev", dev_mixer, x.to(device)), ("ref", ref_mixer, x.float())):
        mixer.train()
        mixer.zero_grad()
        xs = xs.clone().requires_grad_()
        out = mixer(xs)
        (out.float() * w.to(out.device)).sum().backward()
        grads[name] = (out, xs.grad, {n: p.grad for n, p in mixer.named_parameters()})
        mixer.eval()
    emit(check_row(kind, "train forward T=200", rel_err(grads["dev"][0], grads["ref"][0]), OUTPUT_TOL))
    emit(check_row(kind, "train grad wrt input", rel_err(grads["dev"][1], grads["ref"][1]), GRAD_TOL))
    per_param = {n: rel_err(grads["dev"][2][n], grads["ref"][2][n]) for n in grads["ref"][2]}
    worst = max(per_param, key=per_param.get)
    emit(check_row(kind, "train grad wrt parameters (worst)", per_param[worst], GRAD_TOL, worst_param=worst))


def check_ops(kind: str, device: str, seed: int, emit: Emit) -> None:
    """float32 raw ops (fla on CUDA) vs our torch path on CPU: catches argument-convention slips."""
    ops = fla_ops(device)
    torch_op = delta_rule.gated_delta_rule if kind == "gdn" else delta_rule.kda_rule
    H, K = 4, 64
    for T, path in ((1, "recurrent"), (150, "chunk")):
        dev_in = op_inputs(kind, 2, T, H, K, device, torch.float32, seed + T, state=True)
        cpu_in = {n: t.cpu() for n, t in dev_in.items()}
        with torch.inference_mode():
            o, s = call_op(ops[f"{kind}_{path}"], dev_in, K, device)
            o_ref, s_ref = call_op(torch_op, cpu_in, K, "cpu")
        emit(check_row(kind, f"raw op fp32 T={T} ({path}) output", rel_err(o, o_ref), OP_TOL))
        emit(check_row(kind, f"raw op fp32 T={T} ({path}) final state", rel_err(s, s_ref), OP_TOL))


# ---------------------------------------------------------------------------------- timing


def synthetic_state(mixer: torch.nn.Module, kind: str, B: int, device: str, dtype: torch.dtype) -> SupernetCache:
    """A cache as if some context had been read: the state's size does not depend on its length."""
    cache = SupernetCache(1)
    state = cache.mixer_state(0, kind)
    W = mixer.config.linear_conv_size
    for name, conv in (("conv_q", mixer.q_conv1d), ("conv_k", mixer.k_conv1d), ("conv_v", mixer.v_conv1d)):
        state[name] = torch.randn(B, conv.in_channels, W - 1, device=device, dtype=dtype)
    heads = getattr(mixer, "num_v_heads", mixer.num_heads)
    state["recurrent"] = torch.randn(B, heads, mixer.head_dim, mixer.v_head_dim, device=device) * 0.1
    return cache


class TimingMixers:
    """The timing mixer of one (shape, kind) at a time: rows are grouped by it, so it is built once;
    fla's layer of the same (shape, kind), with the mixer's weights, built at its first use and
    freed with the mixer. `with_fla_layer` (default: on CUDA only) lets a test run fla's layer on
    the CPU under Triton's interpreter."""

    def __init__(self, device: str, dtype: torch.dtype, with_fla_layer: bool | None = None) -> None:
        self.device, self.dtype = device, dtype
        self.with_fla_layer = device == "cuda" if with_fla_layer is None else with_fla_layer
        self.key: tuple | None = None
        self.mixer: torch.nn.Module | None = None
        self.fla: torch.nn.Module | None = None
        self.fla_info: dict[str, Any] | None = None  # None: not built yet for this key

    def get(self, shape_name: str, spec: dict, kind: str) -> torch.nn.Module:
        if self.key != (shape_name, kind):
            self.mixer, self.fla, self.fla_info = None, None, None
            free_memory(self.device)
            config = linear_config(spec["hidden"], spec["heads"], spec["head_dim"])
            self.mixer = on_device(random_mixer(kind, config, seed=0), self.device, self.dtype)
            self.key = (shape_name, kind)
        return self.mixer

    def fla_layer(self, shape_name: str, spec: dict, kind: str) -> tuple[torch.nn.Module | None, dict[str, Any]]:
        """(fla's layer or None, columns for the rows): on its build, `fla_layer_rel_err`, its output
        against our mixer's (same weights, bf16, FLA_CHECK_TOKENS tokens with a fresh cache each), or
        `fla_layer_error` when it cannot be built or run; off CUDA `fla_layer_skipped`."""
        mixer = self.get(shape_name, spec, kind)
        if self.fla_info is None:
            if not self.with_fla_layer:
                self.fla_info = {"fla_layer_skipped": FLA_LAYER_OFF_CUDA}
            else:
                try:
                    config = linear_config(spec["hidden"], spec["heads"], spec["head_dim"])
                    layer = build_fla_layer(spec, kind, config, mixer, self.device, self.dtype)
                    x = torch.randn(2, FLA_CHECK_TOKENS, spec["hidden"], device=self.device, dtype=self.dtype)
                    with torch.inference_mode():
                        ours = mixer(x, cache=SupernetCache(1))
                        theirs = layer(x, past_key_values=fla_cache(), use_cache=True)[0]
                    self.fla = layer
                    self.fla_info = {"fla_layer_rel_err": rel_err(theirs, ours)}
                except Exception as exc:  # recorded in the rows; the item goes on without the column
                    self.fla_info = {"fla_layer_error": f"building/running fla's layer: {error_text(exc)}"}
                layer = x = ours = theirs = None
                if self.fla is None:
                    free_memory(self.device)
        return self.fla, dict(self.fla_info)


def fla_layer_columns(mixers: TimingMixers, shape_name: str, spec: dict, kind: str, layer_ms: float,
                      make_fn: Callable[[torch.nn.Module], Callable[[], Any]]) -> dict[str, Any]:
    """fla_layer_ms (fla's layer timed like ours: bench_ms, inference mode, same input and dtype) and
    layer_over_fla_layer; on failure fla_layer_error instead (the row and the item go on)."""
    cols: dict[str, Any] = {"fla_layer_ms": None, "layer_over_fla_layer": None}
    layer, info = mixers.fla_layer(shape_name, spec, kind)
    cols.update(info)
    if layer is None:
        return cols
    failed = False
    try:
        with torch.inference_mode():
            ms = bench_ms(make_fn(layer), mixers.device)
        cols.update(fla_layer_ms=ms, layer_over_fla_layer=layer_ms / ms)
    except Exception as exc:
        failed = True
        cols["fla_layer_error"] = error_text(exc)
    if failed:  # out of the except block: the traceback no longer holds the call's tensors
        free_memory(mixers.device)
    return cols


def time_prefill(mixers: TimingMixers, shape_name: str, spec: dict, kind: str, B: int, T: int) -> dict:
    device, dtype = mixers.device, mixers.dtype
    H, K, D = spec["heads"], spec["head_dim"], spec["hidden"]
    mixer = mixers.get(shape_name, spec, kind)
    x = torch.randn(B, T, D, device=device, dtype=dtype)
    try:
        with torch.inference_mode():
            layer_ms = bench_ms(lambda: mixer(x, cache=SupernetCache(1)), device)
            with fused_kernels(False):
                layer_torch_ms = bench_ms(lambda: mixer(x, cache=SupernetCache(1)), device)
            inputs = op_inputs(kind, B, T, H, K, device, dtype, seed=T)
            op_ms = bench_ms(lambda: call_op(fla_ops(device)[f"{kind}_chunk"], inputs, K, device), device)
            inputs = None
        # fla's layer on the same input, with a fresh Cache per call as ours gets a fresh SupernetCache
        fla_cols = fla_layer_columns(mixers, shape_name, spec, kind, layer_ms,
                                     lambda layer: lambda: layer(x, past_key_values=fla_cache(), use_cache=True))
    finally:
        del x
        inputs = None
        free_memory(device)
    return {"shape": shape_name, "mixer": kind, "batch": B, "tokens": T, "layer_ms": layer_ms, "op_ms": op_ms,
            "layer_over_op": layer_ms / op_ms, "layer_torch_ms": layer_torch_ms,
            "layer_tokens_per_s": B * T / layer_ms * 1e3, **fla_cols}


def graph_ms(fn: Callable[[], Any], cache: SupernetCache | None, mixers: list[tuple[int, str]],
             device: str) -> float | None:
    """Milliseconds per replay of `fn` captured as a CUDA graph (GraphedStep: cache states that `fn`
    replaces are copied back into the captured ones, as in static decoding); None off CUDA."""
    if device != "cuda":
        return None
    step = GraphedStep(fn, cache, mixers, cuda_graph=True)
    for _ in range(step.warmup + 1):  # eager warm-ups on a side stream, then the capture
        step()
    try:
        return bench_ms(step, device)
    finally:
        del step
        free_memory(device)


def time_decode(mixers: TimingMixers, shape_name: str, spec: dict, kind: str, B: int, ctx: int) -> dict:
    device, dtype = mixers.device, mixers.dtype
    H, K, D = spec["heads"], spec["head_dim"], spec["hidden"]
    mixer = mixers.get(shape_name, spec, kind)
    x = torch.randn(B, 1, D, device=device, dtype=dtype)
    cache = synthetic_state(mixer, kind, B, device, dtype)
    op = fla_ops(device)[f"{kind}_recurrent"]
    with torch.inference_mode():
        inputs = op_inputs(kind, B, 1, H, K, device, dtype, seed=ctx, state=True)
        layer_ms = bench_ms(lambda: mixer(x, cache=cache), device)
        op_ms = bench_ms(lambda: call_op(op, inputs, K, device), device)
        layer_graph_ms = graph_ms(lambda: mixer(x, cache=cache), cache, [(0, kind)], device)
        op_graph_ms = graph_ms(lambda: call_op(op, inputs, K, device), None, [], device)
        with fused_kernels(False):
            layer_torch_ms = bench_ms(lambda: mixer(x, cache=cache), device)
            layer_torch_graph_ms = graph_ms(lambda: mixer(x, cache=cache), cache, [(0, kind)], device)
    # fla's layer, eager only (graph replay needs state tensors that stay in place; through fla's
    # Cache, GDN's fused recurrent kernel returns a new state tensor every step), against our eager layer_ms
    fla_cols = fla_layer_columns(mixers, shape_name, spec, kind, layer_ms, lambda layer: fla_decode_fn(layer, x))
    return {"shape": shape_name, "mixer": kind, "batch": B, "context": ctx, "layer_ms": layer_ms, "op_ms": op_ms,
            "layer_graph_ms": layer_graph_ms, "op_graph_ms": op_graph_ms,
            "graph_layer_over_op": None if op_graph_ms is None else layer_graph_ms / op_graph_ms,
            "layer_torch_ms": layer_torch_ms, "layer_torch_graph_ms": layer_torch_graph_ms, **fla_cols}


# ---------------------------------------------------------------------------------- kernel breakdown


def kernel_category(name: str) -> str:
    """Rough origin of a GPU kernel, from its name."""
    low = name.lower()
    if low.startswith(("memcpy", "memset")):
        return "memcpy/memset"
    if any(tag in low for tag in ("gemm", "cutlass", "xmma", "cublas", "splitk", "nvjet")):
        return "gemm"
    if "at::native" in low or low.startswith("void at::") or "elementwise" in low or "reduce_kernel" in low:
        return "torch (aten)"
    return "triton (fla) / other"


def kernel_breakdown(fn: Callable[[], Any], device: str) -> dict[str, Any]:
    """torch.profiler over PROFILE_ITERS calls of `fn` (after one untimed call), per call: GPU kernels
    by total time (in --smoke mode, CPU ops by self time), their count, and the wall time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(PROFILE_ITERS):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) / PROFILE_ITERS * 1e3
    totals: dict[str, list[float]] = {}  # name -> [microseconds, count]
    for evt in prof.events():
        if device == "cuda":
            if evt.device_type != DeviceType.CUDA:
                continue
            us = evt.time_range.elapsed_us()
        else:
            if evt.device_type != DeviceType.CPU:
                continue
            us = evt.self_cpu_time_total
        entry = totals.setdefault(evt.name, [0.0, 0])
        entry[0] += us
        entry[1] += 1
    total_us = sum(t for t, _ in totals.values())
    by_category: dict[str, float] = {}
    for name, (us, _) in totals.items():
        category = kernel_category(name) if device == "cuda" else "cpu op"
        by_category[category] = by_category.get(category, 0.0) + us / PROFILE_ITERS / 1e3
    top = sorted(totals.items(), key=lambda kv: -kv[1][0])[:PROFILE_TOP]
    return {
        "kernels_per_call": sum(n for _, n in totals.values()) / PROFILE_ITERS,
        "kernel_ms_per_call": total_us / PROFILE_ITERS / 1e3,
        "wall_ms_per_call": wall_ms,
        "by_category_ms": {k: round(v, 5) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "top": [{"name": name[:160], "calls_per_call": n / PROFILE_ITERS, "ms_per_call": us / PROFILE_ITERS / 1e3,
                 "share": us / total_us if total_us else 0.0} for name, (us, n) in top],
    }


def profile_mixer(mixers: TimingMixers, shape_name: str, spec: dict, kind: str, profile_spec: dict,
                  emit: Emit) -> None:
    """Kernel breakdown of one prefill and one eager decode step per batch, layer and raw op."""
    device, dtype = mixers.device, mixers.dtype
    H, K, D = spec["heads"], spec["head_dim"], spec["hidden"]
    mixer = mixers.get(shape_name, spec, kind)
    B, T = profile_spec["prefill"]
    cases = [(f"prefill batch={B} tokens={T}", B, T)] + [(f"decode batch={b}", b, 1) for b in profile_spec["decode_batches"]]
    for case, B, T in cases:
        x = torch.randn(B, T, D, device=device, dtype=dtype)
        decode = case.startswith("decode")
        inputs = op_inputs(kind, B, T, H, K, device, dtype, seed=T, state=decode)
        op = fla_ops(device)[f"{kind}_{'recurrent' if decode else 'chunk'}"]
        with torch.inference_mode():
            if decode:
                cache = synthetic_state(mixer, kind, B, device, dtype)
                layer_fn = lambda: mixer(x, cache=cache)  # noqa: E731
            else:
                layer_fn = lambda: mixer(x, cache=SupernetCache(1))  # noqa: E731
            for target, fn in (("layer", layer_fn), ("op", lambda: call_op(op, inputs, K, device)),
                               ("layer (torch paths)", layer_fn)):
                with fused_kernels(target != "layer (torch paths)"):
                    emit({"shape": shape_name, "mixer": kind, "case": case, "target": target,
                          **kernel_breakdown(fn, device)})
        del x, inputs
        free_memory(device)


# ---------------------------------------------------------------------------------- plan and results


class Item:
    """One unit of work: a check (emits several rows) or one timing row."""

    def __init__(self, name: str, group: str, section: str, run: Callable[[Emit], None]) -> None:
        self.name, self.group, self.section, self.run = name, group, section, run


def build_plan(plan: dict, device: str, dtype: torch.dtype, only_main: bool) -> list[Item]:
    """The items in the order they run: (a) checks, (b) required timings and the kernel breakdown,
    (c) the rest (see the module docstring)."""
    shapes, main = plan["shapes"], plan["main_shape"]
    main_spec = shapes[main]
    others = {} if only_main else {name: spec for name, spec in shapes.items() if name != main}
    check_config = linear_config(main_spec["hidden"], main_spec["heads"], main_spec["head_dim"])
    seeds = {kind: 100 * (i + 1) for i, kind in enumerate(MIXERS)}
    mixers = TimingMixers(device, dtype)
    items: list[Item] = []

    def prefill(group: str, shape_name: str, spec: dict, kind: str, B: int, T: int) -> None:
        items.append(Item(f"prefill {shape_name} {kind} batch={B} tokens={T}", group, "prefill",
                          lambda emit: emit(time_prefill(mixers, shape_name, spec, kind, B, T))))

    def decode(group: str, shape_name: str, spec: dict, kind: str, B: int, ctx: int) -> None:
        items.append(Item(f"decode {shape_name} {kind} batch={B} context={ctx}", group, "decode",
                          lambda emit: emit(time_decode(mixers, shape_name, spec, kind, B, ctx))))

    # (a) checks: also compile + autotune the forward kernels that (b) uses
    items.append(Item("check fused pieces (conv, norm, in-kernel gates)", "a", "correctness",
                      lambda emit: check_fused_ops(main_spec, check_config, device, dtype, 7, emit)))
    for kind in MIXERS:
        items.append(Item(f"check {kind} inference", "a", "correctness",
                          lambda emit, k=kind: check_inference(k, check_config, device, dtype, seeds[k], emit)))
    # (b) required timings, one (shape, kind) at a time (its kernels autotune once); the kernel
    # breakdown right after the first prefill row, which has compiled everything it runs
    for kind in MIXERS:
        first, *rest = main_spec["prefill"]
        prefill("b", main, main_spec, kind, *first)
        items.append(Item(f"profile {main} {kind}", "b", "profile",
                          lambda emit, k=kind: profile_mixer(mixers, main, main_spec, k, plan["profile"], emit)))
        for B, ctx in main_spec["decode"]:
            decode("b", main, main_spec, kind, B, ctx)
        for B, T in rest:
            prefill("b", main, main_spec, kind, B, T)
    for shape_name, spec in others.items():  # decode first: no chunk kernels to autotune for a new shape
        for kind in MIXERS:
            for B, ctx in spec["decode"]:
                decode("b", shape_name, spec, kind, B, ctx)
        for kind in MIXERS:
            for B, T in spec["prefill"]:
                prefill("b", shape_name, spec, kind, B, T)
    # (c) the rest: the main shape's extra prefills, training and raw-op checks, other shapes' extras
    for kind in MIXERS:
        for B, T in main_spec.get("extra_prefill", ()):
            prefill("c", main, main_spec, kind, B, T)
    for kind in MIXERS:
        items.append(Item(f"check {kind} training step", "c", "correctness",
                          lambda emit, k=kind: check_train(k, check_config, device, dtype, seeds[k], emit)))
    for kind in MIXERS:
        items.append(Item(f"check {kind} raw ops fp32", "c", "correctness",
                          lambda emit, k=kind: check_ops(k, device, seeds[k] + 50, emit)))
    for shape_name, spec in others.items():
        for kind in MIXERS:
            for B, T in spec.get("extra_prefill", ()):
                prefill("c", shape_name, spec, kind, B, T)
    return items


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def versions() -> dict[str, str | None]:
    out = {}
    for name in ("fla", "triton"):
        try:
            out[name] = getattr(__import__(name), "__version__", None)
        except Exception:
            out[name] = None
    return out


# ---------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_linear_mixers.json)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to test the script")
    parser.add_argument("--time-limit", type=float, default=210.0,
                        help="seconds after which no new item starts (the rest are recorded as skipped); "
                             "0 = no limit (default 210)")
    parser.add_argument("--only-smollm2", action="store_true",
                        help="leave out the other shapes (FACTS 16x128; in --smoke mode the second tiny shape)")
    parser.add_argument("--items", default=None, metavar="REGEX",
                        help="run only the items whose name matches (after the (a) checks, which always run), "
                             "e.g. 'prefill smollm2 .* batch=64 tokens=32768' for rows a time box left out")
    args = parser.parse_args()
    started = time.perf_counter()

    plan = SMOKE if args.smoke else FULL
    if args.smoke:
        device = "cpu"
        torch.set_num_threads(1)  # tiny ops: thread barriers would dominate, worse on a shared CPU
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device; run on a GPU machine, or pass --smoke for a CPU test run", file=sys.stderr)
            return 2
        if not delta_rule.fla_available():
            print("error: fla is not importable (pip install flash-linear-attention / fla-core and triton); "
                  "the CUDA path would fall back to torch", file=sys.stderr)
            return 2
        device = "cuda"
    dtype = torch.bfloat16
    out_path = Path(args.out) if args.out else RESULTS / "gpu_linear_mixers.json"
    items = build_plan(plan, device, dtype, args.only_smollm2)
    if args.items:
        try:
            wanted = re.compile(args.items)
        except re.error as exc:
            print(f"error: --items is not a regular expression ({exc}); quote it, e.g. --items 'tokens=32768'",
                  file=sys.stderr)
            return 2
        items = [item for item in items if item.group == "a" or wanted.search(item.name)]
        if all(item.group == "a" for item in items):
            print(f"error: --items {args.items!r} matches no item; names look like "
                  "'prefill smollm2 gdn batch=64 tokens=32768' or 'decode smollm2 kda batch=1 context=2048'",
                  file=sys.stderr)
            return 2
    shapes = {n: s for n, s in plan["shapes"].items() if not args.only_smollm2 or n == plan["main_shape"]}

    results: dict[str, list] = {"correctness": [], "prefill": [], "decode": [], "profile": []}
    item_log: list[dict] = []
    skipped: list[dict] = []
    errors: list[dict] = []
    header = {
        "device": device_name(), "torch": torch.__version__, **versions(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "smoke": args.smoke, "dtype": str(dtype),
        "kernels": "fla chunk_gated_delta_rule / fused_recurrent_gated_delta_rule, chunk_kda / fused_recurrent_kda; "
                   "layer: fla causal_conv1d(_update), rms_norm_gated, gates inside the delta-rule kernels"
                   if device == "cuda" else "torch (supernet.ops)",
        "time_limit_s": args.time_limit, "only_smollm2": args.only_smollm2, "items_filter": args.items,
        "bench": f"triton do_bench median, warmup {BENCH_WARMUP_MS} ms, rep {BENCH_REP_MS} ms, after one "
                 "untimed call (compilation, autotuning); *_graph_ms: the same of one CUDA graph replay"
                 if device == "cuda" else "perf_counter median of 3",
        "shapes": shapes, "profile_cases": plan["profile"],
        "fla_layer": {
            name: {kind: {"class": f"fla.layers.{FLA_LAYER_CLASSES[kind]}",
                          "kwargs": fla_layer_kwargs(spec, kind, cfg),
                          "differences": fla_layer_differences(kind, cfg)}
                   for kind in MIXERS}
            for name, spec in shapes.items()
            for cfg in [linear_config(spec["hidden"], spec["heads"], spec["head_dim"])]
        },
        "order": "(a) checks: fused pieces, inference incl. graphed decode; (b) main shape: prefill batch 1, "
                 "kernel breakdown, decode (eager + graph), prefill batch 64 at 2k/8k; other shapes' decode, then "
                 "prefill rows; "
                 "(c) main shape's extra prefills, training-step checks, fp32 raw-op checks, other shapes' extras",
    }

    def save(complete: bool) -> None:
        checks = results["correctness"]
        check_errors = [e for e in errors if e["section"] == "correctness"]
        write_json_atomic(out_path, {
            **header, "complete": complete,
            "all_checks_ok": bool(checks) and all(r["ok"] for r in checks) and not check_errors,
            "seconds": round(time.perf_counter() - started, 1),
            **results, "items": item_log, "skipped": skipped, "errors": errors,
            "notes": [
                "layer = whole mixer (projections, short convs, gates, kernel, gated norm, o_proj); op = raw kernel",
                f"layer_torch_ms / layer_torch_graph_ms / 'layer (torch paths)': the same layer with {ENV_SWITCH}=0 "
                "(torch conv, norm and gates: the layer before the fused paths), same run and device",
                "prefill runs with a fresh decode cache (final states kept), inference mode",
                "decode starts from a synthetic state: a linear mixer's state is the same size at any context",
                "decode *_graph_ms: one step captured as a CUDA graph (supernet.static_decode.GraphedStep) and replayed; "
                "layer_ms/op_ms are eager (launch-bound for small batches)",
                "profile: torch.profiler, per call: kernels_per_call, kernel_ms_per_call (sum of GPU kernel times), "
                "wall_ms_per_call (includes profiler overhead), top kernels, by_category_ms (from kernel names)",
                "items[].seconds: wall time of each item, compilation and autotuning included",
                "fla_layer_ms: fla's own layer (header fla_layer: class, kwargs, differences) with our mixer's "
                "weights, same input, dtype, inference mode and bench as layer_ms; prefill with a fresh fla Cache "
                "per call (use_cache=True), decode eager from a random state in fla's Cache (no CUDA graph); "
                "layer_over_fla_layer = layer_ms / fla_layer_ms (eager both); fla_layer_rel_err: fla's layer vs "
                f"ours on {FLA_CHECK_TOKENS} tokens, batch 2, same weights (bf16 both; recorded, not a check); "
                "fla_layer_error: why a row has no fla_layer_ms"
                + ("" if device == "cuda" else f"; this run: {FLA_LAYER_OFF_CUDA}"),
            ],
        })

    def emitter(item: Item) -> Emit:
        def emit(row: dict) -> None:
            results[item.section].append(row)
            if item.section == "correctness":
                extra = f" worst={row['worst_param']}" if "worst_param" in row else ""
                print(f"[{time.perf_counter() - started:6.1f}s] check {row['mixer']} {row['check']}: "
                      f"rel_err {row['rel_err']:.3g} (tol {row['tol']:g}) {'ok' if row['ok'] else 'FAIL'}{extra}",
                      flush=True)
            elif item.section == "profile":
                print(f"[{time.perf_counter() - started:6.1f}s] profile {row['shape']} {row['mixer']} {row['case']} "
                      f"{row['target']}: {row['kernels_per_call']:g} kernels, {row['kernel_ms_per_call']:.4g} ms in "
                      f"kernels, {row['wall_ms_per_call']:.4g} ms wall", flush=True)
            else:
                where = f"tokens={row['tokens']}" if "tokens" in row else f"context={row['context']}"
                graph = (f"; graph: layer {row['layer_graph_ms']:.4g} ms, op {row['op_graph_ms']:.4g} ms"
                         if row.get("layer_graph_ms") is not None else "")
                if row.get("fla_layer_ms") is not None:
                    fla = f"; fla layer {row['fla_layer_ms']:.4g} ms (ours x{row['layer_over_fla_layer']:.3g})"
                elif row.get("fla_layer_error"):
                    fla = f"; fla layer failed: {row['fla_layer_error'][:200]}"
                else:
                    fla = ""
                print(f"[{time.perf_counter() - started:6.1f}s] {item.section} {row['shape']} {row['mixer']} "
                      f"batch={row['batch']} {where}: layer {row['layer_ms']:.4g} ms, op {row['op_ms']:.4g} ms"
                      f"{graph}{fla}", flush=True)
            save(False)
        return emit

    print(f"{len(items)} items on {header['device']}; time limit {args.time_limit:g} s", flush=True)
    save(False)
    for item in items:
        elapsed = time.perf_counter() - started
        if args.time_limit > 0 and elapsed > args.time_limit:
            skipped.append({"item": item.name, "group": item.group, "reason": SKIPPED_TIME})
            continue
        t0 = time.perf_counter()
        failed = False
        try:
            item.run(emitter(item))
            item_log.append({"item": item.name, "group": item.group, "seconds": round(time.perf_counter() - t0, 2)})
        except Exception as exc:  # one failing item (OOM, a kernel error) must not lose the others
            failed = True
            errors.append({"item": item.name, "group": item.group, "section": item.section,
                           "seconds": round(time.perf_counter() - t0, 2),
                           "error": f"{type(exc).__name__}: {exc}"[:2000],
                           "traceback": traceback.format_exc(limit=6)[-4000:]})
            print(f"[{time.perf_counter() - started:6.1f}s] ERROR in {item.name}: {type(exc).__name__}: {exc}",
                  flush=True)
        if failed:  # out of the except block: the traceback no longer holds the item's tensors
            free_memory(device)
        save(False)
    if skipped:
        print(f"[{time.perf_counter() - started:6.1f}s] time limit: skipped {len(skipped)} items "
              f"(first: {skipped[0]['item']})", flush=True)
    save(True)

    tables = (
        ("correctness", ["mixer", "check", "rel_err", "tol", "ok"],
         "correctness: device path (bf16) vs CPU torch path (fp32)"),
        ("prefill", ["shape", "mixer", "batch", "tokens", "layer_ms", "op_ms", "layer_over_op", "fla_layer_ms",
                     "layer_over_fla_layer", "fla_layer_rel_err", "layer_torch_ms", "layer_tokens_per_s"],
         "prefill per layer (ms, median)"),
        ("decode", ["shape", "mixer", "batch", "context", "layer_ms", "op_ms", "layer_graph_ms", "op_graph_ms",
                    "graph_layer_over_op", "fla_layer_ms", "layer_over_fla_layer", "layer_torch_ms",
                    "layer_torch_graph_ms"],
         "decode step per layer (ms, median; *_graph_ms: CUDA graph replay; fla_layer_ms: fla's layer, eager)"),
        ("profile", ["shape", "mixer", "case", "target", "kernels_per_call", "kernel_ms_per_call", "wall_ms_per_call"],
         "kernel breakdown per call (top kernels in the JSON)"),
    )
    for section, columns, title in tables:
        if results[section]:  # print_table needs at least one row
            print_table(results[section], columns, title)
    timed = results["prefill"] + results["decode"]
    for note in sorted({r.get("fla_layer_error") or r.get("fla_layer_skipped") for r in timed} - {None}):
        print(f"fla layer: {note[:300]}")
    ok = bool(results["correctness"]) and all(r["ok"] for r in results["correctness"]) and not errors
    elapsed = time.perf_counter() - started
    print(f"\nwrote {out_path}")
    print(f"{'all checks passed' if ok else 'SOME CHECKS FAILED OR ERRORS'}; {len(item_log)} items done, "
          f"{len(skipped)} skipped, {len(errors)} errors; {elapsed:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
