"""`supernet merge merge.yaml`: merge supernets of one layout tensor by tensor, mixer by mixer.

Why: two supernets fine-tuned from the same start (different data, different placements sampled)
can be combined without more training, as mergekit does for plain transformers. Every tensor of
the checkpoint is merged: each mixer of each layer (fa, swa, gdn, kda) and the shared weights
(embeddings, norms, MLPs). The rules are in supernet/merge_methods.py.

The YAML (paths relative to the YAML file's folder):

    out: merged/                  # the checkpoint to write (atomically; never one of the inputs)
    method: ties                  # linear | ties | slerp
    base_model: runs/base/final   # ties: the common ancestor; slerp: optional, the t=0 end
    models:
      - model: runs/a/final
        weight: 1.0               # linear / ties (default 1)
        density: 0.5              # ties: share of each task vector kept (default parameters.density)
      - model: runs/b/final
    parameters:                   # defaults for every tensor
      t: 0.5                      # slerp
      density: 1.0                # ties
      lambda: 1.0                 # ties: scale of the merged task vector
      normalize: true             # linear / ties: divide by the (agreeing) weights' sum
    filters:                      # optional, per tensor; the first whose glob matches a name wins
      - match: "model.layers.*.mixers.gdn.*"
        t: 0.3                    # any of t, density, lambda, weights: [one per model]
      - match: "model.embed_tokens.weight"
        keep: base                # copy the tensor of `base` (or `first`, the first model) unchanged
    dtype: float32                # optional output dtype (default: the reference checkpoint's)

The output takes config.json (presets, default placement) and tokenizer from the reference
checkpoint: base_model when given, else the first model.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from supernet import merge_methods
from supernet.io_utils import read_yaml

METHODS = ("linear", "ties", "slerp")
TOP_KEYS = {"out", "method", "base_model", "models", "parameters", "filters", "dtype"}
MODEL_KEYS = {"model", "weight", "density"}
PARAM_KEYS = {"t", "density", "lambda", "normalize"}
FILTER_KEYS = {"match", "keep", "t", "density", "lambda", "weights"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# config.json keys that do not change the computation a tensor takes part in
FREE_CONFIG_KEYS = {"presets", "placement", "preset", "presets_cost_source", "_name_or_path", "transformers_version",
                    "torch_dtype", "dtype", "architectures", "use_cache", "teacher_family", "auto_map",
                    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "output_attentions",
                    "output_hidden_states", "return_dict", "chunk_size_feed_forward", "id2label", "label2id"}


class MergeError(ValueError):
    """A bad merge YAML or incompatible checkpoints; one line naming the problem and the fix."""


@dataclass
class ModelEntry:
    path: Path
    weight: float = 1.0
    density: float | None = None


@dataclass
class TensorFilter:
    match: str
    keep: str | None = None
    t: float | None = None
    density: float | None = None
    lam: float | None = None
    weights: list[float] | None = None


@dataclass
class MergeSpec:
    out: Path
    method: str
    models: list[ModelEntry]
    base: Path | None = None
    t: float = 0.5
    density: float = 1.0
    lam: float = 1.0
    normalize: bool = True
    filters: list[TensorFilter] = field(default_factory=list)
    dtype: str | None = None

    @property
    def reference(self) -> Path:
        return self.base if self.base is not None else self.models[0].path


# ------------------------------------------------------------------------------------------------
# the YAML
# ------------------------------------------------------------------------------------------------
def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MergeError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _density(value: Any, what: str) -> float:
    d = _number(value, what)
    if not 0.0 < d <= 1.0:
        raise MergeError(f"{what} must be in (0, 1] (the share of each task vector TIES keeps), got {d}")
    return d


def _t(value: Any, what: str) -> float:
    t = _number(value, what)
    if not 0.0 <= t <= 1.0:
        raise MergeError(f"{what} must be in [0, 1] (0: the first endpoint, 1: the second), got {t}")
    return t


def _unknown(keys: Any, known: set[str], where: str) -> None:
    extra = sorted(set(keys) - known)
    if extra:
        raise MergeError(f"unknown key '{extra[0]}' in {where}; known keys: {', '.join(sorted(known))}")


def _checkpoint(path: Path, what: str) -> Path:
    if not (path / "config.json").is_file():
        raise MergeError(f"{what} {path} is not a checkpoint folder (no config.json); give a supernet checkpoint")
    if not sorted(path.glob("*.safetensors")):
        raise MergeError(f"{what} {path} holds no .safetensors weights")
    return path


def load_merge_spec(path: str | Path) -> MergeSpec:
    """Read and check a merge YAML (one-line MergeErrors); the checkpoints are checked to exist."""
    path = Path(path)
    doc = read_yaml(path, "merge file", "see `supernet merge --help` for its keys", MergeError)
    if not isinstance(doc, dict):
        raise MergeError(f"merge file {path} must hold a mapping (out, method, models, ...)")
    _unknown(doc, TOP_KEYS, f"merge file {path}")
    root = path.resolve().parent

    def where(p: Any, what: str) -> Path:
        if not isinstance(p, str) or not p.strip():
            raise MergeError(f"{what} must be a path, got {p!r}")
        q = Path(p).expanduser()
        return q if q.is_absolute() else root / q

    method = doc.get("method")
    if method not in METHODS:
        raise MergeError(f"method {method!r} is not supported; choose one of {', '.join(METHODS)}")
    if "out" not in doc:
        raise MergeError("the merge file has no `out:` (the checkpoint folder to write)")
    out = where(doc["out"], "out")
    raw_models = doc.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise MergeError("the merge file lists no `models:`; give a list of `- model: PATH` entries")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise MergeError("`parameters:` must be a mapping (t, density, lambda, normalize)")
    _unknown(params, PARAM_KEYS, "parameters")
    spec = MergeSpec(out=out, method=method, models=[])
    if "t" in params:
        spec.t = _t(params["t"], "parameters.t")
    if "density" in params:
        spec.density = _density(params["density"], "parameters.density")
    if "lambda" in params:
        spec.lam = _number(params["lambda"], "parameters.lambda")
    if "normalize" in params:
        if not isinstance(params["normalize"], bool):
            raise MergeError(f"parameters.normalize must be true or false, got {params['normalize']!r}")
        spec.normalize = params["normalize"]
    for i, entry in enumerate(raw_models):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergeError(f"models[{i}] must be a mapping with `model: PATH`, got {entry!r}")
        _unknown(entry, MODEL_KEYS, f"models[{i}]")
        m = ModelEntry(_checkpoint(where(entry["model"], f"models[{i}].model"), f"models[{i}]"))
        if "weight" in entry:
            m.weight = _number(entry["weight"], f"models[{i}].weight")
        if "density" in entry:
            m.density = _density(entry["density"], f"models[{i}].density")
        spec.models.append(m)
    if doc.get("base_model") is not None:
        spec.base = _checkpoint(where(doc["base_model"], "base_model"), "base_model")
    if doc.get("dtype") is not None:
        if doc["dtype"] not in DTYPES:
            raise MergeError(f"dtype {doc['dtype']!r} is not supported; choose one of {', '.join(DTYPES)}")
        spec.dtype = doc["dtype"]
    spec.filters = _filters(doc.get("filters") or [], len(spec.models))
    _check_method(spec)
    inputs = {m.path.resolve() for m in spec.models} | ({spec.base.resolve()} if spec.base else set())
    if out.resolve() in inputs:
        raise MergeError(f"out {out} is one of the merged checkpoints; write the merge to a new folder")
    return spec


def _filters(raw: Any, n_models: int) -> list[TensorFilter]:
    if not isinstance(raw, list):
        raise MergeError("`filters:` must be a list of mappings with `match: GLOB`")
    out = []
    for i, f in enumerate(raw):
        if not isinstance(f, dict) or not isinstance(f.get("match"), str):
            raise MergeError(f"filters[{i}] must be a mapping with `match: GLOB` (a tensor-name pattern)")
        _unknown(f, FILTER_KEYS, f"filters[{i}]")
        tf = TensorFilter(f["match"])
        if "keep" in f:
            if f["keep"] not in ("base", "first"):
                raise MergeError(f"filters[{i}].keep must be base or first, got {f['keep']!r}")
            tf.keep = f["keep"]
        if "t" in f:
            tf.t = _t(f["t"], f"filters[{i}].t")
        if "density" in f:
            tf.density = _density(f["density"], f"filters[{i}].density")
        if "lambda" in f:
            tf.lam = _number(f["lambda"], f"filters[{i}].lambda")
        if "weights" in f:
            w = f["weights"]
            if not isinstance(w, list) or len(w) != n_models:
                raise MergeError(f"filters[{i}].weights must list one weight per model ({n_models}), got {w!r}")
            tf.weights = [_number(x, f"filters[{i}].weights[{j}]") for j, x in enumerate(w)]
        out.append(tf)
    return out


def _check_weights(weights: list[float], spec: MergeSpec, where: str) -> None:
    if spec.method == "ties" and any(w <= 0 for w in weights):
        raise MergeError(f"{where}: TIES needs positive weights (they scale each model's share of the sign "
                         f"election), got {weights}")
    if spec.normalize and spec.method == "linear" and not sum(weights) > 0:
        raise MergeError(f"{where}: the weights sum to {sum(weights)}, and a normalized linear merge divides by "
                         "their sum; make it positive or set parameters.normalize: false")


def _check_method(spec: MergeSpec) -> None:
    if spec.method == "linear" and spec.base is not None:
        raise MergeError("method linear takes no base_model (it averages the models); drop it or use ties")
    if spec.method == "ties" and spec.base is None:
        raise MergeError("method ties needs base_model: the common ancestor the task vectors are taken from")
    if spec.method == "slerp":
        ends = slerp_ends(spec)
        if len(ends) != 2:
            raise MergeError(f"method slerp interpolates exactly two checkpoints; got {len(ends)} "
                             "(base_model + one model, or two models)")
    if any(f.keep == "base" for f in spec.filters) and spec.base is None:
        raise MergeError("a filter says keep: base but there is no base_model; use keep: first")
    _check_weights([m.weight for m in spec.models], spec, "models")
    for i, f in enumerate(spec.filters):
        if f.weights is not None:
            _check_weights(f.weights, spec, f"filters[{i}]")


def slerp_ends(spec: MergeSpec) -> list[Path]:
    """The t=0 and t=1 checkpoints: base_model then the other model, or the two models in order."""
    if spec.base is None:
        return [m.path for m in spec.models]
    others = [m.path for m in spec.models if m.path.resolve() != spec.base.resolve()]
    return [spec.base] + others


# ------------------------------------------------------------------------------------------------
# layouts
# ------------------------------------------------------------------------------------------------
def read_layout(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a checkpoint, read from the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                shapes[k] = tuple(h.get_slice(k).get_shape())
    return shapes


def layer_mixers(shapes: dict[str, tuple[int, ...]]) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for name in shapes:
        parts = name.split(".")
        if "layers" in parts and parts[parts.index("layers") + 1].isdigit():
            layer = int(parts[parts.index("layers") + 1])
            mixers = out.setdefault(layer, set())
            if "mixers" in parts:
                mixers.add(parts[parts.index("mixers") + 1])
    return out


def check_same_layout(ref: Path, other: Path) -> None:
    """Refuse checkpoints that differ in layers, mixers, tensor names, shapes or architecture settings."""
    from supernet.io_utils import read_json

    a, b = read_layout(ref), read_layout(other)
    la, lb = layer_mixers(a), layer_mixers(b)
    if len(la) != len(lb):
        raise MergeError(f"{other} has {len(lb)} layers but {ref} has {len(la)}; merge checkpoints of one layout")
    for i in sorted(la):
        if la[i] != lb.get(i):
            raise MergeError(f"layer {i} of {other} holds mixers {','.join(sorted(lb.get(i, ())))} but {ref}'s holds "
                             f"{','.join(sorted(la[i]))}; merge checkpoints of one layout")
    missing = sorted(set(a) - set(b)) or sorted(set(b) - set(a))
    if missing:
        name = missing[0]
        has, lacks = (ref, other) if name in a else (other, ref)
        raise MergeError(f"tensor {name} is in {has} but not in {lacks}; merge checkpoints of one layout")
    for name in sorted(a):
        if a[name] != b[name]:
            raise MergeError(f"tensor {name} is {list(b[name])} in {other} but {list(a[name])} in {ref}; "
                             "merge checkpoints of one layout")
    ca = read_json(ref / "config.json", "config", "convert the checkpoint again", MergeError)
    cb = read_json(other / "config.json", "config", "convert the checkpoint again", MergeError)
    if ca.get("model_type") != "supernet" or cb.get("model_type") != "supernet":
        raise MergeError(f"{ref if ca.get('model_type') != 'supernet' else other} is not a supernet checkpoint "
                         "(model_type in config.json); convert it with `supernet convert` first")
    for key in sorted((set(ca) | set(cb)) - FREE_CONFIG_KEYS):
        if ca.get(key) != cb.get(key):
            raise MergeError(f"config key {key} is {cb.get(key)!r} in {other} but {ca.get(key)!r} in {ref}; "
                             "merge checkpoints of one architecture")


# ------------------------------------------------------------------------------------------------
# merging
# ------------------------------------------------------------------------------------------------
def tensor_group(name: str) -> str:
    """What a tensor belongs to, for progress: `layer 3 gdn`, `layer 3 shared`, or `shared`."""
    parts = name.split(".")
    if "layers" in parts and parts[parts.index("layers") + 1].isdigit():
        i = parts[parts.index("layers") + 1]
        return f"layer {i} {parts[parts.index('mixers') + 1]}" if "mixers" in parts else f"layer {i} shared"
    return "shared"


def rule_for(name: str, filters: list[TensorFilter]) -> TensorFilter | None:
    return next((f for f in filters if fnmatch.fnmatchcase(name, f.match)), None)


def merge_tensor(spec: MergeSpec, name: str, get) -> torch.Tensor:
    """The merged float64 tensor `name`; `get(path)` reads it from one checkpoint."""
    rule = rule_for(name, spec.filters)
    if rule is not None and rule.keep is not None:
        return get(spec.base if rule.keep == "base" else spec.models[0].path).to(torch.float64)
    weights = rule.weights if rule is not None and rule.weights is not None else [m.weight for m in spec.models]
    if spec.method == "linear":
        return merge_methods.linear([get(m.path) for m in spec.models], weights, spec.normalize)
    if spec.method == "ties":
        dens = [rule.density if rule is not None and rule.density is not None else
                (m.density if m.density is not None else spec.density) for m in spec.models]
        lam = rule.lam if rule is not None and rule.lam is not None else spec.lam
        return merge_methods.ties([get(m.path) for m in spec.models], get(spec.base), weights, dens, lam,
                                  spec.normalize)
    t = rule.t if rule is not None and rule.t is not None else spec.t
    x0, x1 = slerp_ends(spec)
    return merge_methods.slerp(get(x0), get(x1), t)


def run_merge(spec: MergeSpec, progress: bool = True, threads: int = 1) -> Path:
    """Check the layouts, merge every tensor, write `spec.out` as a normal checkpoint (atomically).
    Elementwise work on one thread by default (see supernet.threads)."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    from supernet.convert import save_checkpoint
    from supernet.snr import natural_key
    from supernet.threads import torch_threads

    ref = spec.reference
    inputs = list(dict.fromkeys([ref] + [m.path for m in spec.models]))
    for other in inputs[1:]:
        check_same_layout(ref, other)
    handles: dict[Path, dict[str, Any]] = {}
    for p in inputs:
        files = [safe_open(str(f), framework="pt") for f in sorted(p.glob("*.safetensors"))]
        handles[p] = {k: h for h in files for k in h.keys()}

    names = sorted(read_layout(ref), key=natural_key)
    ref_dtype = handles[ref][names[0]].get_tensor(names[0]).dtype
    out_dtype = DTYPES[spec.dtype] if spec.dtype else ref_dtype
    merged: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(names), unit="tensor", desc=f"merge ({spec.method})", disable=not progress)
    with torch_threads(threads):
        for current in names:
            bar.set_postfix_str(tensor_group(current), refresh=False)
            x = handles[ref][current].get_tensor(current)
            tensor = merge_tensor(spec, current, lambda path, name=current: handles[path][name].get_tensor(name))
            merged[current] = tensor.to(out_dtype if x.is_floating_point() else x.dtype)
            bar.update(1)
    bar.close()
    return _write(ref, merged, spec.out, out_dtype, save_checkpoint)


def _write(ref: Path, merged: dict[str, torch.Tensor], out: Path, dtype: torch.dtype, save_checkpoint) -> Path:
    import supernet.model  # noqa: F401  (registers the Auto classes)
    from supernet.model import SupernetForCausalLM

    model = SupernetForCausalLM.from_pretrained(str(ref), dtype=dtype)
    missing, unexpected = model.load_state_dict(merged, strict=False)
    tied = {k for k in missing if k == "lm_head.weight" and model.config.tie_word_embeddings}
    if unexpected or set(missing) - tied:
        raise MergeError(f"the merged tensors do not fit {ref}'s model: missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    tokenizer = None
    if (ref / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(ref))
    return save_checkpoint(model, out, tokenizer)
