"""Training configuration: nested dataclasses read from YAML, with strict key checking.

A typo in a config key silently falling back to a default would waste a GPU-day, so every unknown
key is an error that names the key and the known ones. `--set a.b=value` overrides use the same
path syntax and the same checks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message is one line naming the key and the fix."""


@dataclass
class StudentConfig:
    # A supernet checkpoint folder. Null: convert the teacher at start into <out_dir>/student-init.
    path: str | None = None
    # Config overrides for the conversion (e.g. swa_window, gdn_num_heads); ignored when path is set.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherEntry:
    """One teacher of several (`teacher.teachers`): online or from its own top-K cache."""

    source: str = "online"  # online | offline
    path: str | None = None  # online: HF folder, .gguf, smollm2 or builtin:tiny-llama
    gguf_file: str | None = None
    cache_dir: str | None = None  # offline: its training top-K cache
    eval_cache_dir: str | None = None  # offline: its top-K cache of the held-out set
    weight: float = 1.0  # share in the mixture (mode mix) or of the steps (mode alternate)


@dataclass
class TeacherConfig:
    # online: a frozen teacher model runs beside the student on the same micro-batch.
    # self-fa: the student itself under the all-fa placement, no grad (valid only when the shared
    #          weights and the fa mixers are frozen, i.e. equal to the converted teacher).
    # offline: top-K log-probabilities read from a cache written by `supernet cache-logits`.
    source: str = "online"
    # HF folder or .gguf file; `builtin:tiny-llama` builds a tiny seeded teacher (smoke tests).
    path: str | None = None
    gguf_file: str | None = None
    cache_dir: str | None = None  # offline: the training top-K cache
    eval_cache_dir: str | None = None  # offline: a top-K cache of the held-out set (for eval)
    # several teachers (training/teachers.py): list them here instead of source/path/cache_dir above
    teachers: list[TeacherEntry] = field(default_factory=list)
    mode: str = "mix"  # with teachers: mix (log-probability mixture) | alternate (one teacher per step)


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # jsonl / txt files or globs
    eval: list[str] = field(default_factory=list)
    format: str = "auto"  # auto | text | chat
    seq_len: int = 2048
    separator: str = "eos"  # token after each text document: eos | bos | a literal token string
    shuffle: bool = True
    cache_dir: str | None = None  # tokenised-corpus cache; default <out_dir>/data-cache
    max_documents: int | None = None  # read only the first N documents of each split


@dataclass
class LossConfig:
    kind: str = "fkl"  # fkl (forward KL) | rkl (reverse KL) | jsd (Jensen-Shannon, beta 0.5) | mix
    kl_mix: float = 0.5  # kind mix: (1 - kl_mix) * forward KL + kl_mix * reverse KL
    temperature: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0  # cross-entropy on the next token (temperature 1)
    hidden_weight: float = 0.0  # per-layer hidden-state matching (relative squared error)
    hidden_layers: list[int] | None = None  # decoder layers to match; null = all
    chunk_tokens: int = 4096  # tokens per chunk of the fused lm_head + loss
    # mixer-output activation loss: each layer's sampled mixer output against the teacher
    # attention's output (training/transfer.py); Fast-LLM's example configs use 0.8
    activation_weight: float = 0.0
    activation_kind: str = "nmse"  # nmse (relative squared error per token) | mse (per dimension)
    compile: str = "auto"  # torch.compile the per-chunk KL math: auto (on CUDA) | true | false


@dataclass
class SamplingConfig:
    # uniform | weighted | full_layout (every split of layer counts between `mixers` equally
    # likely, then a random arrangement) | targeted (a preset with probability preset_prob, else `base`)
    strategy: str = "uniform"
    base: str = "uniform"  # targeted: the strategy of the other draws (uniform | weighted | full_layout)
    mixers: list[str] = field(default_factory=lambda: ["fa", "swa", "gdn", "kda"])
    weights: dict[str, float] = field(default_factory=dict)  # weighted: mixer -> weight
    presets: list[Any] = field(default_factory=list)  # target placements: all-gdn, lists, names
    preset_prob: float = 0.0  # probability of drawing one of `presets` instead of sampling
    presets_file: str | None = None  # presets.json whose placements join `presets`


@dataclass
class TransferConfig:
    # stage transfer: mixers regressed onto the teacher's attention output at every layer (fa is
    # the teacher's attention itself, so it cannot be listed); only those in train.train_mixers train
    mixers: list[str] = field(default_factory=lambda: ["swa", "gdn", "kda"])
    loss: str = "nmse"  # nmse (relative squared error per token) | mse (per dimension)
    layers_per_chunk: int = 0  # layers per checkpointed region (0: all layers in one)
    checkpoint: bool = False  # activation checkpointing per chunk: one chunk's mixer internals alive


@dataclass
class TrainConfig:
    # mixers (shared weights frozen) | all | a selection YAML written by `supernet snr` (Spectrum): exactly
    # the parameters it lists under `trainable` train, every other one is frozen; a relative path in a
    # config file is relative to that file
    trainable: str = "mixers"
    train_mixers: list[str] = field(default_factory=lambda: ["fa", "swa", "gdn", "kda"])
    micro_batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = 1000
    max_tokens: int | None = None  # token budget; if set, max_steps = ceil(budget / tokens per step)
    lr: float = 1e-3
    # LR multiplier per mixer (and "shared"), e.g. {fa: 0.1, swa: 0.1}: mixers that start as exact
    # copies of the teacher's attention need smaller steps than the freshly initialised linear ones.
    mixer_lr_scale: dict[str, float] = field(default_factory=dict)
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    activation_checkpointing: bool = False
    compile: bool = False
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    frozen_bf16: str = "auto"  # store frozen weights and the teacher in bf16: auto (on CUDA) | true | false
    fused_adamw: str = "auto"  # AdamW's fused kernel: auto (on CUDA) | true | false (the for-each kernels)
    gc_every: int = 50  # Python GC: collect the young generations every N steps (0: automatic)
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class EvalConfig:
    every: int = 200  # 0 = never (except at_start / at_end)
    num_sequences: int = 16
    batch_size: int = 4
    placements: list[Any] = field(default_factory=lambda: ["all-fa", "all-swa", "all-gdn", "all-kda"])
    at_start: bool = True
    at_end: bool = True


@dataclass
class CheckpointConfig:
    every: int = 500  # 0 = only at the end
    keep_last: int = 3
    resume: str = "auto"  # auto (latest in out_dir) | none | path to a checkpoint folder
    # resume even where a key that changes the computation (model, data, loss, sampling, batch)
    # differs from the checkpoint's run config (`--resume-force`); see RESUME_KEYS
    resume_force: bool = False
    save_final: bool = True  # write <out_dir>/final as a supernet HF folder


@dataclass
class LogConfig:
    every: int = 10
    tensorboard: bool = False
    progress: bool = True


@dataclass
class DistributedConfig:
    strategy: str = "auto"  # auto (FSDP2 under torchrun, none otherwise) | fsdp | ddp | none
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU)
    # FSDP2: shard the frozen teacher (true: its memory splits over the ranks) or hold a full copy on
    # every rank (false: no all-gathers for it; for a teacher small next to a GPU's memory)
    shard_teacher: bool = True
    # FSDP2 unit size: 0 = one unit per trainable mixer (a step gathers only its sampled mixers);
    # K = K consecutive layers per unit, student and teacher (fewer, larger collectives)
    layers_per_unit: int = 0


@dataclass
class RunConfig:
    stage: str = "distill"  # distill | sft | transfer
    out_dir: str = "runs/default"
    seed: int = 0
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES: dict[str, tuple[str, ...]] = {
    "stage": ("distill", "sft", "transfer"),
    "teacher.source": ("online", "self-fa", "offline"),
    "teacher.mode": ("mix", "alternate"),
    "data.format": ("auto", "text", "chat"),
    "loss.kind": ("fkl", "rkl", "jsd", "mix"),
    "loss.activation_kind": ("nmse", "mse"),
    "transfer.loss": ("nmse", "mse"),
    "sampling.base": ("uniform", "weighted", "full_layout"),
    "loss.compile": ("auto", "true", "false"),
    "sampling.strategy": ("uniform", "weighted", "full_layout", "targeted"),
    "train.precision": ("auto", "bf16", "fp32"),
    "train.frozen_bf16": ("auto", "true", "false"),
    "train.fused_adamw": ("auto", "true", "false"),
    "train.device": ("auto", "cpu", "cuda"),
    "distributed.strategy": ("auto", "fsdp", "ddp", "none"),
    "distributed.backend": ("auto", "nccl", "gloo"),
}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert one YAML value against a dataclass field type."""
    origin = get_origin(hint)
    args = get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__}")
        return _build(hint, value, key + ".")
    if value is None:
        if type(None) in args or hint is Any:
            return None
        raise ConfigError(f"config key '{key}' must not be null")
    if origin is not None and type(None) in args:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key) if len(inner) == 1 else value
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string; users write rates so
            try:
                return float(value.strip())
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number (e.g. 3e-4 or 0.0003), got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, bool):  # YAML turns `true` into a bool; our string enums say "true"
            return "true" if value else "false"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return str(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; known keys here: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    obj = cls(**kwargs)
    for path, allowed in CHOICES.items():
        if not path.startswith(prefix) or "." in path[len(prefix):]:
            continue
        name = path[len(prefix):]
        if getattr(obj, name) not in allowed:
            raise ConfigError(f"config key '{path}' is {getattr(obj, name)!r}; choose one of {', '.join(allowed)}")
    return obj


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`["loss.kl_weight=0.5", "data.train=[a.jsonl]"]` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        _set_path(out, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> RunConfig:
    data = dict(data or {})
    if isinstance(data.get("teacher"), list):  # `teacher: [..]` is short for `teacher: {teachers: [..]}`
        data["teacher"] = {"teachers": data["teacher"]}
    cfg = _build(RunConfig, _merge(data, overrides or {}))
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] | None = None,
                stage: str | None = None) -> RunConfig:
    """Read a YAML config; relative data/teacher/student paths stay relative to the working dir."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; see training/configs/ for examples")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    if stage is not None:
        data.setdefault("stage", stage)
        if data["stage"] != stage:
            raise ConfigError(f"config {path} says stage '{data['stage']}' but this command runs '{stage}'")
    train = data.get("train")
    if isinstance(train, dict) and isinstance(train.get("trainable"), str) and is_selection_file(train["trainable"]):
        selection = Path(train["trainable"]).expanduser()
        if not selection.is_absolute():  # a selection file sits beside the config that names it
            data = {**data, "train": {**train, "trainable": str(path.resolve().parent / selection)}}
    ov = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    return config_from_dict(data, ov)


def is_selection_file(trainable: str) -> bool:
    """train.trainable names a selection file (anything but the keywords mixers / all)."""
    return trainable not in TRAINABLE_KEYWORDS


TRAINABLE_KEYWORDS = ("mixers", "all")


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that a single key's type cannot express."""
    from supernet.layout import MIXERS

    if is_selection_file(cfg.train.trainable) and not Path(cfg.train.trainable).expanduser().is_file():
        raise ConfigError(f"train.trainable is {cfg.train.trainable!r}: neither mixers, all nor an existing selection "
                          "file; write one with `supernet snr CKPT --top-percent P --out FILE`")
    if is_selection_file(cfg.train.trainable):  # its form now, its names once the student is loaded
        from supernet.snr import SNRError, read_selection

        try:
            read_selection(Path(cfg.train.trainable).expanduser())
        except SNRError as exc:
            raise ConfigError(str(exc)) from None
    for m in cfg.sampling.mixers + cfg.train.train_mixers + list(cfg.sampling.weights) + \
            [k for k in cfg.train.mixer_lr_scale if k != "shared"]:
        if m not in MIXERS:
            raise ConfigError(f"unknown mixer {m!r} in the sampling/train config; choose from {', '.join(MIXERS)}")
    if not cfg.sampling.mixers:
        raise ConfigError("sampling.mixers is empty; list at least one mixer")
    if not 0.0 <= cfg.sampling.preset_prob <= 1.0:
        raise ConfigError("sampling.preset_prob must lie in [0, 1]")
    if cfg.sampling.preset_prob > 0 and not (cfg.sampling.presets or cfg.sampling.presets_file):
        raise ConfigError("sampling.preset_prob > 0 needs sampling.presets or sampling.presets_file")
    if cfg.train.trainable == "mixers" and not set(cfg.sampling.mixers) & set(cfg.train.train_mixers) \
            and not cfg.sampling.presets and not cfg.sampling.presets_file:
        raise ConfigError("no mixer in sampling.mixers is in train.train_mixers, so nothing would train; "
                          "make them overlap")
    if cfg.data.seq_len < 2:
        raise ConfigError("data.seq_len must be at least 2")
    if cfg.train.micro_batch_size < 1 or cfg.train.grad_accum < 1:
        raise ConfigError("train.micro_batch_size and train.grad_accum must be >= 1")
    if cfg.loss.temperature <= 0:
        raise ConfigError("loss.temperature must be positive")
    if cfg.stage != "transfer" and cfg.loss.kl_weight == 0 and cfg.loss.ce_weight == 0 and \
            cfg.loss.hidden_weight == 0 and cfg.loss.activation_weight == 0:
        raise ConfigError("all loss weights are zero; set loss.kl_weight, loss.ce_weight, loss.hidden_weight "
                          "or loss.activation_weight")
    _validate_new_losses(cfg)
    if cfg.teacher.teachers:
        _validate_teachers(cfg)
    else:
        _validate_one_teacher(cfg)
    if cfg.loss.chunk_tokens < 1:
        raise ConfigError("loss.chunk_tokens must be >= 1")
    if cfg.train.gc_every < 0:
        raise ConfigError("train.gc_every must be >= 0 (0: Python's automatic garbage collection; N: every N steps)")
    if cfg.distributed.layers_per_unit < 0:
        raise ConfigError("distributed.layers_per_unit must be >= 0 (0: one FSDP2 unit per mixer; K: K layers per unit)")
    _validate_sampling(cfg.sampling)
    _validate_optimizer(cfg.train)
    if cfg.loss.hidden_layers is not None and any(i < 0 for i in cfg.loss.hidden_layers):
        raise ConfigError(f"loss.hidden_layers {cfg.loss.hidden_layers} has a negative index; "
                          "list decoder layers from 0, or null for all")
    if cfg.train.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("train.device is cuda but this host has no CUDA device (or this torch build has no "
                              "CUDA); set train.device: cpu or auto")
    if cfg.log.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("log.tensorboard is true but tensorboard is not installed; "
                              "pip install 'supernet[tensorboard]' or set log.tensorboard: false")


def _validate_one_teacher(cfg: RunConfig) -> None:
    """The checks of the single-teacher keys (teacher.source/path/cache_dir)."""
    needs_teacher = cfg.loss.kl_weight > 0 or cfg.loss.hidden_weight > 0 or cfg.loss.activation_weight > 0 \
        or cfg.stage == "transfer"
    src = cfg.teacher.source
    if needs_teacher and src == "online" and not cfg.teacher.path:
        raise ConfigError("teacher.path is required for an online teacher (or set teacher.source: offline / self-fa)")
    if needs_teacher and src == "offline" and not cfg.teacher.cache_dir:
        raise ConfigError("teacher.cache_dir is required with teacher.source: offline (write it with `supernet cache-logits`)")
    if src == "offline" and cfg.loss.hidden_weight > 0:
        raise ConfigError("loss.hidden_weight needs teacher hidden states; the offline cache has only logits (use source online)")
    if src == "offline" and cfg.loss.kind != "fkl":
        raise ConfigError("the offline top-K cache supports loss.kind fkl only (tail mass is a single bucket)")
    if src == "self-fa" and (cfg.train.trainable == "all" or "fa" in cfg.train.train_mixers):
        raise ConfigError("teacher.source self-fa needs frozen fa mixers and shared weights: "
                          "set train.trainable: mixers and drop fa from train.train_mixers")
    if cfg.student.path is None and not cfg.teacher.path:
        raise ConfigError("student.path is not set, so the student is converted from the teacher; set teacher.path")
    if not cfg.data.train and not (src == "offline" and cfg.teacher.cache_dir):
        raise ConfigError("data.train lists no files; give at least one jsonl/txt path")


def _validate_teachers(cfg: RunConfig) -> None:
    """`teacher.teachers`: several teachers, each online or offline, with weights (training/teachers.py)."""
    import math

    t = cfg.teacher
    if t.source != "online" or t.path or t.gguf_file or t.cache_dir or t.eval_cache_dir:
        raise ConfigError("teacher.teachers lists the teachers, so leave teacher.source/path/gguf_file/cache_dir/"
                          "eval_cache_dir unset and give them per teacher, e.g. teachers: [{path: A, weight: 1}, "
                          "{source: offline, cache_dir: B, weight: 1}]")
    weights = [e.weight for e in t.teachers]
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"teacher.teachers weights must be >= 0 with a positive sum, got {weights}")
    for i, e in enumerate(t.teachers):
        if e.source not in ("online", "offline"):
            raise ConfigError(f"teacher.teachers[{i}].source is {e.source!r}; choose one of online, offline")
        if e.source == "online" and not e.path:
            raise ConfigError(f"teacher.teachers[{i}] is online but has no path; give its HF folder / .gguf / smollm2")
        if e.source == "offline" and not e.cache_dir:
            raise ConfigError(f"teacher.teachers[{i}] is offline but has no cache_dir (write it with "
                              "`supernet cache-logits`)")
    if cfg.stage == "transfer" or cfg.loss.hidden_weight > 0 or cfg.loss.activation_weight > 0:
        raise ConfigError("several teachers give logit targets only: stage transfer, loss.hidden_weight and "
                          "loss.activation_weight need one teacher's hidden states (list one teacher)")
    if cfg.student.path is None:
        raise ConfigError("with teacher.teachers, set student.path (a supernet checkpoint with the teachers' "
                          "vocabulary; `supernet convert` one teacher or `supernet transplant-vocab`)")
    offline = [e for e in t.teachers if e.source == "offline"]
    if offline and cfg.loss.kind != "fkl":
        raise ConfigError("the offline top-K cache supports loss.kind fkl only (tail mass is a single bucket)")
    if len(offline) < len(t.teachers) and not cfg.data.train:
        raise ConfigError("data.train lists no files, but an online teacher needs them; give at least one jsonl/txt path")
    if cfg.data.eval or any(e.eval_cache_dir for e in offline):
        missing = [i for i, e in enumerate(t.teachers) if e.source == "offline" and not e.eval_cache_dir]
        if missing:
            raise ConfigError(f"held-out evaluation scores every teacher, but teacher.teachers[{missing[0]}] (offline) "
                              "has no eval_cache_dir; add one or leave data.eval empty")
        if len(offline) < len(t.teachers) and not cfg.data.eval:
            raise ConfigError("held-out evaluation with an online teacher needs data.eval; add it or drop the "
                              "offline teachers' eval_cache_dir")


def _validate_new_losses(cfg: RunConfig) -> None:
    """kl_mix, the activation loss and stage transfer (issue 17)."""
    from supernet.layout import MIXERS

    lo, t = cfg.loss, cfg.transfer
    if not 0.0 <= lo.kl_mix <= 1.0:
        raise ConfigError(f"loss.kl_mix must lie in [0, 1] (the reverse-KL share of loss.kind mix), got {lo.kl_mix}")
    if lo.activation_weight < 0:
        raise ConfigError(f"loss.activation_weight must be >= 0, got {lo.activation_weight}")
    if lo.activation_weight > 0 and cfg.teacher.source == "offline":
        raise ConfigError("loss.activation_weight needs the teacher's attention outputs; the offline cache has "
                          "only logits (use teacher.source online or self-fa)")
    if lo.kind == "mix" and cfg.teacher.source == "offline":
        raise ConfigError("the offline top-K cache supports loss.kind fkl only (tail mass is a single bucket)")
    for m in t.mixers:
        if m not in MIXERS:
            raise ConfigError(f"unknown mixer {m!r} in transfer.mixers; choose from {', '.join(MIXERS)}")
    if t.layers_per_chunk < 0:
        raise ConfigError("transfer.layers_per_chunk must be >= 0 (0: all layers in one chunk)")
    if cfg.stage != "transfer":
        return
    if "fa" in t.mixers:
        raise ConfigError("transfer.mixers lists fa, the teacher's attention itself; drop it (e.g. [swa, gdn, kda])")
    if cfg.train.trainable == "all":
        raise ConfigError("stage transfer trains mixers only (the shared weights get no gradient); "
                          "set train.trainable: mixers (or a selection file of mixer parameters)")
    if not set(t.mixers) & set(cfg.train.train_mixers):
        raise ConfigError(f"stage transfer: no mixer of transfer.mixers ({', '.join(t.mixers) or 'none'}) is in "
                          "train.train_mixers, so nothing would train; make them overlap")
    if cfg.teacher.source == "offline":
        raise ConfigError("stage transfer needs the teacher's hidden states; the offline cache has only logits "
                          "(use teacher.source online or self-fa)")
    if cfg.distributed.layers_per_unit:
        raise ConfigError("stage transfer calls each mixer directly, outside its layer's forward, so FSDP2 needs "
                          "one unit per mixer: set distributed.layers_per_unit: 0")


def _validate_sampling(s: SamplingConfig) -> None:
    if s.strategy == "targeted":
        if s.preset_prob <= 0 or not (s.presets or s.presets_file):
            raise ConfigError("sampling.strategy targeted needs sampling.presets or sampling.presets_file and "
                              "sampling.preset_prob > 0 (the share of preset draws), e.g. 0.5")
    if "weighted" in (s.strategy, s.base if s.strategy == "targeted" else None):
        weights = {m: s.weights.get(m, 0.0) for m in s.mixers}
        if any(w < 0 for w in s.weights.values()) or sum(weights.values()) <= 0:
            raise ConfigError("sampling.strategy weighted needs sampling.weights, non-negative with a positive sum "
                              f"over sampling.mixers ({', '.join(s.mixers)}), e.g. --set 'sampling.weights="
                              "{gdn: 2, kda: 1}'; or use strategy uniform")
    elif s.weights:
        raise ConfigError("sampling.weights is set but no weighted strategy uses it; set strategy: weighted "
                          "(or targeted with base: weighted) or remove the weights")


def _validate_optimizer(t: TrainConfig) -> None:
    import math

    if t.trainable == "mixers" and not t.train_mixers:
        raise ConfigError("train.train_mixers is empty, so nothing would train; list at least one mixer "
                          "(e.g. [gdn, kda]) or set train.trainable: all")
    if not (math.isfinite(t.lr) and t.lr > 0):
        raise ConfigError(f"train.lr must be a positive number, got {t.lr}; e.g. train.lr=3e-4")
    for name, scale in t.mixer_lr_scale.items():
        if not (math.isfinite(scale) and scale >= 0):
            raise ConfigError(f"train.mixer_lr_scale.{name} must be >= 0, got {scale}")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise ConfigError(f"train.betas must be two numbers in [0, 1), got {t.betas}; e.g. train.betas=[0.9,0.95]")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio must lie in [0, 1], got {t.min_lr_ratio}")
    if t.weight_decay < 0 or t.grad_clip < 0:
        raise ConfigError("train.weight_decay and train.grad_clip must be >= 0 (grad_clip 0: no clipping)")
    if t.warmup_steps < 0 or t.max_steps < 0 or (t.max_tokens is not None and t.max_tokens < 1):
        raise ConfigError("train.warmup_steps and train.max_steps must be >= 0 and train.max_tokens >= 1 (or null)")


def check_models(cfg: RunConfig, student_config: Any, teacher_config: Any | None,
                 teacher_path: str | None = None) -> None:
    """Checks that need the models' configs (layer count, vocabulary); run once both are known."""
    n = student_config.num_hidden_layers
    bad = [i for i in cfg.loss.hidden_layers or [] if not 0 <= i < n]
    if bad:
        raise ConfigError(f"loss.hidden_layers lists layer {bad[0]}, but the student has {n} layers "
                          f"(0..{n - 1}); fix the list or set it to null for all layers")
    if teacher_config is not None and teacher_config.vocab_size != student_config.vocab_size:
        raise ConfigError(vocabulary_mismatch(f"{teacher_config.vocab_size} tokens", teacher_path or cfg.teacher.path,
                                              f"{student_config.vocab_size}"))


def check_tokenizers(student_tokenizer: Any, teacher_tokenizer: Any, teacher_path: str | None) -> None:
    """Same vocabulary size is not enough: the same ids must mean the same tokens."""
    if student_tokenizer is None or teacher_tokenizer is None:
        return
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ConfigError(vocabulary_mismatch(f"another tokenizer, {len(teacher_tokenizer)} tokens", teacher_path,
                                              f"{len(student_tokenizer)} tokens"))


def vocabulary_mismatch(teacher_has: str, teacher_path: str | None, student_has: str) -> str:
    """The one-line refusal of a teacher with another vocabulary, naming the way across."""
    return (f"the teacher's vocabulary ({teacher_has}, teacher {teacher_path}) differs from the student's "
            f"({student_has}); distilling needs one vocabulary: transplant the student first (`supernet "
            f"transplant-vocab STUDENT --tokenizer {teacher_path} --out S2`, then student.path: S2), ideally with "
            "an offline top-K cache (`supernet cache-logits`); see training/README.md, cross-vocabulary distillation")


# Keys whose change alters what a resumed run computes (model, data order, loss, sampling, batch).
# Schedule and bookkeeping keys (max_steps, lr, eval, checkpoint, log, distributed) may change on resume.
RESUME_KEYS = ("stage", "seed", "student", "teacher.source", "teacher.path", "teacher.gguf_file",
               "teacher.cache_dir", "teacher.teachers", "teacher.mode", "data.train", "data.format", "data.seq_len", "data.separator",
               "data.shuffle", "data.max_documents", "loss.kind", "loss.temperature", "loss.kl_weight",
               "loss.ce_weight", "loss.hidden_weight", "loss.hidden_layers", "loss.kl_mix", "loss.activation_weight",
               "loss.activation_kind", "transfer.mixers", "transfer.loss", "sampling", "train.trainable",
               "train.train_mixers", "train.micro_batch_size", "train.grad_accum")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def resume_differences(saved: dict[str, Any], current: RunConfig) -> list[str]:
    """`key: saved -> now` for every RESUME_KEYS entry that differs (nested keys compared leaf by leaf)."""
    try:
        old = _flatten(_build(RunConfig, saved).to_dict())  # no validate(): another host's checks
    except ConfigError as exc:
        return [f"the saved run config does not load ({exc})"]
    new = _flatten(current.to_dict())
    diffs = []
    for key in sorted(set(old) | set(new)):
        if not any(key == k or key.startswith(k + ".") for k in RESUME_KEYS):
            continue
        if old.get(key) != new.get(key):
            diffs.append(f"{key} was {old.get(key)!r}, now {new.get(key)!r}")
    return diffs
