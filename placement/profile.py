"""Device profiles: a roofline per kernel plus per-layer and per-step latencies, fitted from timings.

Counting bytes alone says all-SWA (window 512) decodes ~7x faster than all-FA at batch 64, context
8192 on an H200; it measured 3.6x. A small model's decode step is mostly fixed latency: every layer
launches a dozen kernels whose time does not shrink with their size. The model here:

    step = step_latency + L * layer_latency + sum_k roofline(shared kernel k)
           + sum over layers i of [ mixer_latency[m_i] + roofline(mixer m_i at B, N) ]
    roofline(kernel) = max(bytes / bandwidth, flops / peak)

Bytes and FLOPs come from the mixer registry (weights once per step; each sequence's cache or state;
the MLPs and lm_head are the shared kernels). A profile (bandwidth, peak, latencies) is data: JSON
files under supernet/placement/profiles/ (installed with the package), fitted by `fit_profile` from
measured whole steps and `costs --measure` tables (benchmarks/bench_cost_model.py refits the shipped
H200 profile and checks it leave-one-out). Pure numpy: no torch.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from supernet.layout import MIXERS, PlacementError
from supernet.mixers.registry import shared_parameter_counts, spec

STEP, LAYER, FIXED = "step", "layer", "fixed"  # what an observation timed


@dataclass
class DeviceProfile:
    """Bandwidth, peak and latencies of one device (and software stack), in SI units."""

    name: str
    description: str
    bandwidth: float  # bytes/s reached by decode kernels (fitted, not the datasheet's)
    peak_flops: float  # FLOP/s of the matmuls
    step_latency: float  # s per step, whatever the depth (embedding, sampling, launch)
    layer_latency: float  # s per layer beside the mixer (norms, MLP launches, residual adds)
    mixer_latency: dict[str, float]  # s per layer of each mixer, beyond its roofline
    dtype_bytes: int = 2
    state_bytes: int = 4
    fit: dict[str, Any] = field(default_factory=dict)  # what it was fitted from, and how well
    device: str = "cuda"  # the device type it describes (cuda / cpu): a warning compares it with the one used

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        from supernet.io_utils import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        lat = ", ".join(f"{m} {1e6 * v:.1f}" for m, v in self.mixer_latency.items())
        return (f"{self.name}: {self.bandwidth / 1e9:.0f} GB/s, {self.peak_flops / 1e12:.3g} TFLOP/s, latencies "
                f"(us) step {1e6 * self.step_latency:.1f}, layer {1e6 * self.layer_latency:.1f}, mixers {lat}")


def profile_from_dict(data: Any, source: str = "profile") -> DeviceProfile:
    if not isinstance(data, dict):
        raise PlacementError(f"{source} must be a JSON object (a device profile)")
    try:
        lat = {str(k): float(v) for k, v in data["mixer_latency"].items()}
        prof = DeviceProfile(str(data["name"]), str(data.get("description", "")), float(data["bandwidth"]),
                             float(data["peak_flops"]), float(data["step_latency"]), float(data["layer_latency"]),
                             lat, int(data.get("dtype_bytes", 2)), int(data.get("state_bytes", 4)),
                             dict(data.get("fit", {})), str(data.get("device", "cuda")))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PlacementError(f"{source} is not a device profile ({type(exc).__name__}: {exc}); "
                             "write one with `supernet costs CKPT --fit-profile OUT.json`") from None
    missing = [m for m in MIXERS if m not in lat]
    if missing:
        raise PlacementError(f"{source} has no latency for mixer {missing[0]!r}")
    if not (prof.bandwidth > 0 and prof.peak_flops > 0):
        raise PlacementError(f"{source}: bandwidth and peak_flops must be positive")
    return prof


def shipped_profiles() -> list[str]:
    """Names of the profiles installed with the package (supernet/placement/profiles/*.json)."""
    folder = resources.files("supernet.placement").joinpath("profiles")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A shipped profile by name ('h200') or a profile JSON file."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise PlacementError(f"no device profile at {path}")
        try:
            return profile_from_dict(json.loads(path.read_text()), f"profile {path}")
        except json.JSONDecodeError as exc:
            raise PlacementError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}") from None
    name = str(name_or_path)
    if name not in shipped_profiles():
        raise PlacementError(f"unknown device profile {name!r}; shipped: {', '.join(shipped_profiles())} "
                             "(or give a profile .json)")
    text = resources.files("supernet.placement").joinpath("profiles", f"{name}.json").read_text()
    return profile_from_dict(json.loads(text), f"profile {name}")


# -- the model -------------------------------------------------------------------------------------
def mixer_kernel(config: Any, mixer: str, batch: int, context: int, dtype_bytes: int = 2,
                 state_bytes: int = 4) -> tuple[float, float]:
    """(bytes, FLOPs) of one layer's mixer in one decode step of `batch` sequences at `context`."""
    s = spec(mixer)
    nbytes = s.weight_bytes(config, dtype_bytes) + batch * s.decode_bytes(config, context, dtype_bytes, state_bytes)
    return float(nbytes), float(batch * s.decode_flops(config, context))


def shared_kernels(config: Any, batch: int, dtype_bytes: int = 2) -> list[tuple[float, float, int]]:
    """(bytes, FLOPs, how many per step) of the placement-independent kernels: each layer's MLP, lm_head."""
    p = shared_parameter_counts(config)
    D, V, L = config.hidden_size, config.vocab_size, config.num_hidden_layers
    mlp = ((p["layer_matmul"] + p["layer_other"]) * dtype_bytes + 2 * batch * D * dtype_bytes,
           2.0 * batch * p["layer_matmul"], L)
    head = ((p["lm_head"] + p["final_norm"]) * dtype_bytes + batch * V * 4, 2.0 * batch * p["lm_head"], 1)
    return [(float(mlp[0]), mlp[1], mlp[2]), (float(head[0]), head[1], head[2])]


def roofline(nbytes: float, flops: float, profile: DeviceProfile) -> float:
    return max(nbytes / profile.bandwidth, flops / profile.peak_flops)


def mixer_layer_seconds(profile: DeviceProfile, config: Any, mixer: str, batch: int, context: int) -> float:
    b, f = mixer_kernel(config, mixer, batch, context, profile.dtype_bytes, profile.state_bytes)
    return profile.mixer_latency[mixer] + roofline(b, f, profile)


def fixed_seconds(profile: DeviceProfile, config: Any, batch: int) -> float:
    shared = sum(n * roofline(b, f, profile) for b, f, n in shared_kernels(config, batch, profile.dtype_bytes))
    return profile.step_latency + config.num_hidden_layers * profile.layer_latency + shared


def step_seconds(profile: DeviceProfile, config: Any, counts: Mapping[str, int], batch: int, context: int) -> float:
    """Predicted decode step of a placement given by its mixer counts."""
    return fixed_seconds(profile, config, batch) + sum(
        n * mixer_layer_seconds(profile, config, m, batch, context) for m, n in counts.items() if n)


def profile_costs(config: Any, profile: DeviceProfile, context: int, batch: int, mode: str = "decode"):
    """A CostTable in ms from a device profile: decode ms/step, or prefill ms per prompt token.

    Prefill: one forward over `batch` prompts of `context` tokens, each kernel's roofline over all
    their tokens plus the same latencies once, divided by `context` (not fitted to prefill timings).
    """
    from supernet.placement.cost import MODES, CostTable

    if mode not in MODES:
        raise PlacementError(f"unknown cost mode {mode!r}; use decode or prefill")
    if context < 1 or batch < 1:
        raise PlacementError("context length and batch size must be >= 1")
    per_layer = {}
    if mode == "decode":
        for m in MIXERS:
            per_layer[m] = np.array([1e3 * mixer_layer_seconds(profile, config, m, batch, context)])
        fixed = 1e3 * fixed_seconds(profile, config, batch)
        unit = "ms/step"
    else:
        tokens = batch * context
        for m in MIXERS:
            s = spec(m)
            nbytes = s.weight_bytes(config, profile.dtype_bytes) + tokens * 2 * s.decode_bytes(config, 1, profile.dtype_bytes)
            t = profile.mixer_latency[m] + roofline(nbytes, tokens * s.prefill_flops(config, context), profile)
            per_layer[m] = np.array([1e3 * t / context])
        shared = sum(n * roofline(b, f * context, profile) for b, f, n in shared_kernels(config, tokens, profile.dtype_bytes))
        fixed = 1e3 * (profile.step_latency + config.num_hidden_layers * profile.layer_latency + shared) / context
        unit = "ms/token"
    meta = {"mode": mode, "source": "analytic", "num_layers": config.num_hidden_layers, "profile": profile.name,
            "profile_device": profile.device,
            "dtype_bytes": profile.dtype_bytes, "state_bytes": profile.state_bytes}
    return CostTable(per_layer, float(fixed), unit, context, batch, meta)


# -- fitting ---------------------------------------------------------------------------------------
@dataclass
class Observation:
    """One timing: a whole decode step (`counts` of a placement), one mixer layer alone, or the fixed part."""

    kind: str  # STEP, LAYER or FIXED
    config: Any
    batch: int
    context: int
    ms: float
    counts: dict[str, int] = field(default_factory=dict)  # STEP: mixer -> layers; LAYER: {mixer: 1}
    label: str = ""
    source: str = ""
    weight: float = 1.0

    @property
    def key(self) -> str:
        """What a leave-one-out run holds out together: the same placement at the same setting."""
        mix = " ".join(f"{m}:{self.counts[m]}" for m in MIXERS if self.counts.get(m))
        return f"{self.kind} {mix} B={self.batch} N={self.context}"


PARAMS = ("inv_bandwidth", *(f"latency_{m}" for m in MIXERS), "layer_latency", "step_latency")


def _design(obs: Observation, inv_bw: float | None, peak: float, dtype_bytes: int,
            state_bytes: int) -> tuple[np.ndarray, float]:
    """Row of the linear model in PARAMS (seconds) and the compute-bound offset, at the current inv_bw
    (None: every kernel taken as bandwidth-bound, the first guess)."""
    row, offset = np.zeros(len(PARAMS)), 0.0

    def add(nbytes: float, flops: float, times: float) -> None:
        nonlocal offset
        if inv_bw is None or nbytes * inv_bw >= flops / peak:
            row[0] += times * nbytes
        else:
            offset += times * flops / peak

    for m, n in obs.counts.items():
        if n:
            b, f = mixer_kernel(obs.config, m, obs.batch, obs.context, dtype_bytes, state_bytes)
            add(b, f, n)
            row[1 + MIXERS.index(m)] += n
    if obs.kind in (STEP, FIXED):
        for b, f, n in shared_kernels(obs.config, obs.batch, dtype_bytes):
            add(b, f, n)
        row[-2] += obs.config.num_hidden_layers
        row[-1] += 1.0
    return row, offset


def _nnls(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    from scipy.optimize import nnls

    return nnls(A, y)[0]


def fit_profile(observations: Sequence[Observation], name: str, description: str = "", *,
                peak_flops: float | None = None, dtype_bytes: int = 2, state_bytes: int = 4, device: str = "cuda",
                ridge: float = 1e-4, iterations: int = 8) -> DeviceProfile:
    """Least relative squares, non-negative, over the observations.

    The model is linear in 1/bandwidth and the latencies once it is known which kernels are
    compute-bound, so this alternates: assume each kernel's bound, solve, re-decide. `peak_flops`
    given: kept (decode timings rarely reach it); None: chosen from a log grid by the residual.
    `ridge` (relative to each column's scale) only settles splits the data cannot tell apart (the
    step and per-layer latencies when every model had the same depth).
    """
    obs = [o for o in observations if o.ms > 0]
    if len(obs) < 3:
        raise PlacementError(f"fitting a profile needs at least 3 timings, got {len(obs)}")
    weights = np.array([o.weight for o in obs])

    def fit_at(peak: float) -> tuple[float, DeviceProfile]:
        theta, inv_bw = None, None
        for _ in range(iterations):
            rows = [_design(o, inv_bw, peak, dtype_bytes, state_bytes) for o in obs]
            A = np.array([r for r, _ in rows])
            y = np.array([1e-3 * o.ms - off for o, (_, off) in zip(obs, rows)])
            w = weights / np.array([1e-3 * o.ms for o in obs])  # relative residuals
            scale = np.maximum(np.abs(A).max(axis=0), 1e-30)
            reg = np.diag(np.where(np.abs(A).max(axis=0) > 0, ridge, 1.0))
            new = _nnls(np.vstack([A / scale * w[:, None], reg]), np.concatenate([y * w, np.zeros(len(PARAMS))])) / scale
            if theta is not None and np.allclose(new, theta, rtol=1e-9, atol=0):
                break
            theta = new
            inv_bw = new[0] if new[0] > 0 else inv_bw
        prof = _profile(theta, peak, name, description, dtype_bytes, state_bytes)
        err = np.array([predict(prof, o) / o.ms - 1 for o in obs])
        return float(np.sum((weights * err) ** 2)), prof

    if peak_flops is not None:
        prof = fit_at(peak_flops)[1]
    else:  # a log grid, then golden-section refinement of log(peak) around the best grid point
        grid = np.logspace(9, 16, 57)
        scores = [fit_at(p)[0] for p in grid]
        i = int(np.argmin(scores))
        lo, hi = np.log(grid[max(i - 1, 0)]), np.log(grid[min(i + 1, len(grid) - 1)])
        g = (np.sqrt(5) - 1) / 2
        for _ in range(30):
            a, b = hi - g * (hi - lo), lo + g * (hi - lo)
            if fit_at(np.exp(a))[0] <= fit_at(np.exp(b))[0]:
                hi = b
            else:
                lo = a
        prof = fit_at(float(np.exp((lo + hi) / 2)))[1]
    prof.fit = fit_report(prof, obs)
    prof.device = device
    return prof


def _profile(theta: np.ndarray, peak: float, name: str, description: str, dtype_bytes: int,
             state_bytes: int) -> DeviceProfile:
    inv_bw = theta[0] if theta[0] > 0 else 1e-15  # no bandwidth-bound timing: effectively infinite
    lat = {m: float(theta[1 + i]) for i, m in enumerate(MIXERS)}
    return DeviceProfile(name, description, float(1.0 / inv_bw), float(peak), float(theta[-1]), float(theta[-2]),
                         lat, dtype_bytes, state_bytes)


def predict(profile: DeviceProfile, obs: Observation) -> float:
    """The profile's prediction of an observation, in ms."""
    if obs.kind == STEP:
        return 1e3 * step_seconds(profile, obs.config, obs.counts, obs.batch, obs.context)
    if obs.kind == FIXED:
        return 1e3 * fixed_seconds(profile, obs.config, obs.batch)
    (m,) = [m for m, n in obs.counts.items() if n]
    return 1e3 * mixer_layer_seconds(profile, obs.config, m, obs.batch, obs.context)


def fit_report(profile: DeviceProfile, observations: Iterable[Observation]) -> dict:
    rows = [{"label": o.label, "source": o.source, "kind": o.kind, "batch": o.batch, "context": o.context,
             "measured_ms": o.ms, "predicted_ms": predict(profile, o), "weight": o.weight}
            for o in observations]
    for r in rows:
        r["error"] = r["predicted_ms"] / r["measured_ms"] - 1
    steps = [abs(r["error"]) for r in rows if r["kind"] == STEP]
    return {"observations": len(rows), "max_abs_step_error": max(steps) if steps else None,
            "max_abs_error": max(abs(r["error"]) for r in rows) if rows else None, "rows": rows}


def leave_one_out(observations: Sequence[Observation], name: str, **fit_kw) -> list[dict]:
    """Hold out every whole-step placement in turn (all its timings), fit on the rest, predict it."""
    out = []
    keys = list(dict.fromkeys(o.key for o in observations if o.kind == STEP))
    for key in keys:
        train = [o for o in observations if o.key != key]
        prof = fit_profile(train, name, **fit_kw)
        for o in observations:
            if o.key == key:
                p = predict(prof, o)
                out.append({"label": o.label, "source": o.source, "counts": dict(o.counts), "batch": o.batch,
                            "context": o.context, "measured_ms": o.ms, "predicted_ms": p,
                            "error": p / o.ms - 1, "held_out": key})
    return out


def speedups(profile: DeviceProfile, config: Any, placements: Mapping[str, Mapping[str, int]], batch: int,
             context: int) -> dict[str, float]:
    """Predicted decode speedup over all-fa of each placement (given by counts)."""
    L = config.num_hidden_layers
    base = step_seconds(profile, config, {"fa": L}, batch, context)
    return {k: base / step_seconds(profile, config, c, batch, context) for k, c in placements.items()}
