"""Correctness checks and per-layer timings of the linear mixers (GDN, KDA): our layer, the raw op
and fla's layer on the same shapes; what benchmarks/gpu_linear_mixers.py runs (its docstring says
what each check and timing means)."""
from __future__ import annotations

import copy
import gc
from typing import Any, Callable

import torch
import torch.nn.functional as F

from supernet.cache import SupernetCache
from supernet.config import SupernetConfig
from supernet.measure.fla_layer import FLA_CHECK_TOKENS, FLA_LAYER_OFF_CUDA, build_fla_layer, fla_cache, fla_decode_fn
from supernet.measure.shapes import linear_config
from supernet.measure.timer import kernel_ms
from supernet.mixers.gdn import GatedDeltaNetMixer
from supernet.mixers.kda import KimiDeltaAttentionMixer
from supernet.ops import delta_rule, gated_norm, short_conv
from supernet.ops.fla_backend import fused_kernels
from supernet.static_decode import GraphedStep

MIXERS = {"gdn": GatedDeltaNetMixer, "kda": KimiDeltaAttentionMixer}
OUTPUT_TOL = 1e-2
GRAD_TOL = 5e-2  # bf16 gradients through a few hundred steps of recurrence
OP_TOL = 1e-3  # float32 kernels vs float32 torch


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
            ms = kernel_ms(make_fn(layer), mixers.device)
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
            layer_ms = kernel_ms(lambda: mixer(x, cache=SupernetCache(1)), device)
            with fused_kernels(False):
                layer_torch_ms = kernel_ms(lambda: mixer(x, cache=SupernetCache(1)), device)
            inputs = op_inputs(kind, B, T, H, K, device, dtype, seed=T)
            op_ms = kernel_ms(lambda: call_op(fla_ops(device)[f"{kind}_chunk"], inputs, K, device), device)
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
        return kernel_ms(step, device)
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
        layer_ms = kernel_ms(lambda: mixer(x, cache=cache), device)
        op_ms = kernel_ms(lambda: call_op(op, inputs, K, device), device)
        layer_graph_ms = graph_ms(lambda: mixer(x, cache=cache), cache, [(0, kind)], device)
        op_graph_ms = graph_ms(lambda: call_op(op, inputs, K, device), None, [], device)
        with fused_kernels(False):
            layer_torch_ms = kernel_ms(lambda: mixer(x, cache=cache), device)
            layer_torch_graph_ms = graph_ms(lambda: mixer(x, cache=cache), cache, [(0, kind)], device)
    # fla's layer, eager only (graph replay needs state tensors that stay in place; through fla's
    # Cache, GDN's fused recurrent kernel returns a new state tensor every step), against our eager layer_ms
    fla_cols = fla_layer_columns(mixers, shape_name, spec, kind, layer_ms, lambda layer: fla_decode_fn(layer, x))
    return {"shape": shape_name, "mixer": kind, "batch": B, "context": ctx, "layer_ms": layer_ms, "op_ms": op_ms,
            "layer_graph_ms": layer_graph_ms, "op_graph_ms": op_graph_ms,
            "graph_layer_over_op": None if op_graph_ms is None else layer_graph_ms / op_graph_ms,
            "layer_torch_ms": layer_torch_ms, "layer_torch_graph_ms": layer_torch_graph_ms, **fla_cols}
