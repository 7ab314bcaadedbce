"""The training loop shared by stage 1 (`distill`) and stage 2 (`sft`).

One optimizer step:
  1. draw a placement (seeded sampler: same on every rank, restored on resume);
  2. for each micro-batch: student forward under that placement, teacher signals (online forward,
     self-fa forward, or offline top-K), fused chunked loss, backward — gradients are summed, with
     each token weighted by 1 / (target tokens in the global batch), so the result equals one big
     batch whatever the split over micro-batches and ranks;
  3. all-reduce the loss, clip gradients, stop on a non-finite loss or gradient norm *before* the
     optimizer step (weights and the last checkpoint stay good), step AdamW and the LR schedule.
Evaluation (KL to the teacher on held-out windows for fixed placements), JSONL metrics, checkpoints.
A stop signal (training/preemption.py) is voted on in step 3's all-reduce, so every rank leaves
after the same step, with a checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from supernet.layout import Placement
from supernet.training import checkpoint as ckpt
from supernet.training.compile import compile_stats, eager_region
from supernet.training.config import ConfigError, RunConfig, check_models, check_tokenizers, resume_differences
from supernet.training.data import GlobalOrder, PackedDataset, build_token_stream, eval_indices
from supernet.training.distributed import (DistEnv, apply_ddp, apply_fsdp, fsdp_layout, gradient_sync, init_distributed,
                                  resolve_strategy, unwrap)
from supernet.training.engine import DistillPair
from supernet.training.losses import LossSpec, TopKTargets
from supernet.training.gc_control import ScheduledGC
from supernet.training.models import (cast_params, load_student, load_teacher_model, load_tokenizer, prepare_student,
                             set_trainable)
from supernet.training.preemption import StopRequest
from supernet.training.sampling import build_sampler, resolve_placements
from supernet.training.sharded_step import clip_local_grads_, fused_adamw_local_step, local_grad_square_sum, shards_are_disjoint


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf; raised before the optimizer step."""


def cosine_schedule(warmup: int, total: int, min_ratio: float):
    """LR multiplier: linear warm-up from 0, then cosine decay to `min_ratio` at `total` steps."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


@dataclass
class TrainResult:
    steps: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss (this process' run)
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    final_dir: Path | None = None
    eval_metric: str = "KL"  # what `evals` holds: KL to the teacher, or CE without a teacher
    stopped_by: str | None = None  # the signal that stopped the run early (SIGTERM, SIGINT, SIGUSR1)
    checkpoint: Path | None = None  # the checkpoint written when the run stopped or finished


class Trainer:
    def __init__(self, cfg: RunConfig, env: DistEnv | None = None) -> None:
        self.cfg = cfg
        # the resolved config (file + overrides): a resume compares against it (RESUME_KEYS)
        self.config_text = "# resolved run config\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        self.env = env or init_distributed(cfg.train.device, cfg.distributed.backend)
        self.out = Path(cfg.out_dir)
        self.stop = StopRequest()  # active during train(): signals finish the step, checkpoint, stop
        self.stop_agreed = False  # some rank got a stop signal (known to all after the step's all-reduce)
        self._setup()

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg, env = self.cfg, self.env
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        env.barrier()
        torch.manual_seed(cfg.seed)
        dev = env.device
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            # fixed shapes all run long: let cuDNN time its algorithms (the depthwise short convs of
            # GDN/KDA) once per shape instead of taking its heuristic choice
            torch.backends.cudnn.benchmark = True
        self.bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and dev.type == "cuda")
        if self.bf16 and dev.type != "cuda":
            self.bf16 = False  # bf16 autocast is slower than fp32 on CPUs (FACTS.md); keep CPU runs exact
        self.compute_dtype = torch.bfloat16 if self.bf16 else torch.float32
        src = cfg.teacher.source
        needs_teacher_signal = cfg.loss.kl_weight > 0 or cfg.loss.hidden_weight > 0 or \
            cfg.loss.activation_weight > 0 or cfg.stage == "transfer"

        self.multi = bool(cfg.teacher.teachers)  # several teachers (training/teachers.py)
        teacher, tokenizer = None, None
        if not self.multi and ((src == "online" and needs_teacher_signal) or cfg.student.path is None):
            teacher, tokenizer = load_teacher_model(cfg.teacher.path, cfg.teacher.gguf_file)
        student_dir = prepare_student(cfg.student.path, self.out, teacher, tokenizer, cfg.student.overrides,
                                      env.is_main, env.barrier)
        if src != "online" or not needs_teacher_signal:
            teacher = None
        self.has_teacher = needs_teacher_signal
        self.student_dir = student_dir
        student = load_student(student_dir)
        if tokenizer is None:
            tokenizer = load_tokenizer(str(student_dir))
        self.tokenizer = tokenizer
        self.trainable_names = set_trainable(student, cfg.train.trainable, cfg.train.train_mixers)
        # which mixers and whether the shared weights have trainable parameters: a placement trains
        # something when it runs one of those mixers, or whenever a shared weight trains
        self.trained_mixers, self.shared_trains = trained_parts(student)
        if self.shared_trains and (src == "self-fa" or cfg.stage == "transfer"):
            shared = next(n for n, p in student.named_parameters() if p.requires_grad and ".mixers." not in n)
            why = "the student's teacher placement is the teacher" if src == "self-fa" else \
                "stage transfer gives the shared weights no gradient"
            raise ConfigError(f"train.trainable {cfg.train.trainable} unfreezes shared parameter {shared}, but {why}; "
                              "select mixer parameters only (`supernet snr CKPT --only mixers ...`)")
        check_models(cfg, student.config, teacher.config if teacher is not None else None)
        if teacher is not None and cfg.student.path is not None:
            check_tokenizers(_student_tokenizer(student_dir), tokenizer, cfg.teacher.path)
        slots = self._load_teachers(student, dev) if self.multi and needs_teacher_signal else None
        if teacher is not None:
            frozen_bf16 = cfg.train.frozen_bf16 == "true" or (cfg.train.frozen_bf16 == "auto" and self.bf16)
            cast_params(teacher, torch.bfloat16 if frozen_bf16 else torch.float32).to(dev)
        student.to(dev)
        self.num_layers = student.config.num_hidden_layers

        # data
        seq = cfg.data.seq_len
        data_cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else self.out / "data-cache"
        if slots is not None:
            self.train_ds, self.eval_ds = self._multi_data(tokenizer, data_cache)
        elif src == "offline" and needs_teacher_signal:
            from supernet.training.logit_cache import TopKCache

            self.train_ds = TopKCache(cfg.teacher.cache_dir)
            self.train_ds.check_compatible(seq, cfg.loss.temperature, tokenizer)
            self.eval_ds = None
            if cfg.teacher.eval_cache_dir:
                self.eval_ds = TopKCache(cfg.teacher.eval_cache_dir)
                self.eval_ds.check_compatible(seq, self.eval_ds.temperature, tokenizer)
        else:
            stream = build_token_stream(cfg.data.train, tokenizer, data_cache, cfg.data.format, cfg.data.separator,
                                        cfg.data.max_documents, env.is_main, env.barrier, cfg.log.progress and env.is_main)
            self.train_ds = PackedDataset(stream, seq)
            self.eval_ds = None
            if cfg.data.eval:
                ev = build_token_stream(cfg.data.eval, tokenizer, data_cache, cfg.data.format, cfg.data.separator,
                                        cfg.data.max_documents, env.is_main, env.barrier, False)
                self.eval_ds = PackedDataset(ev, seq)
        self.order = GlobalOrder(len(self.train_ds), cfg.train.micro_batch_size, cfg.train.grad_accum,
                                 env.world_size, env.rank, cfg.seed, cfg.data.shuffle)
        self.tokens_per_step = self.order.global_batch * seq
        self.max_steps = cfg.train.max_steps
        if cfg.train.max_tokens:
            self.max_steps = math.ceil(cfg.train.max_tokens / self.tokens_per_step)

        # model wrapping
        compiled = cfg.loss.compile == "true" or (cfg.loss.compile == "auto" and dev.type == "cuda")
        spec = LossSpec(cfg.loss.kind, cfg.loss.temperature, cfg.loss.kl_weight, cfg.loss.ce_weight,
                        cfg.loss.chunk_tokens, compiled, cfg.loss.kl_mix)
        self.loss_spec = spec
        mode = src if needs_teacher_signal else "online"
        if cfg.stage == "transfer":  # every trainable mixer of every layer per step (training/transfer.py)
            from supernet.training.transfer import TransferPair

            t = cfg.transfer
            pair = TransferPair(student, teacher, mode, spec, t.mixers, t.loss, t.layers_per_chunk, t.checkpoint,
                                self.compute_dtype)
        else:
            pair = DistillPair(student, teacher, "multi" if slots else mode, spec, cfg.loss.hidden_weight,
                               cfg.loss.hidden_layers, self.compute_dtype, cfg.loss.activation_weight,
                               cfg.loss.activation_kind, slots)
        if cfg.train.activation_checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.compiled_layers = bool(cfg.train.compile)
        if self.compiled_layers:  # per decoder layer (student and teacher): fuses norms, RoPE, SiLU, residuals
            from supernet.training.compile import compile_layers

            if cfg.stage == "transfer":  # the transfer step calls the mixers directly, not the layers
                pair.compile_mixers()
            else:
                compile_layers(student, teacher)
        self.strategy = resolve_strategy(cfg.distributed.strategy, env)
        if slots and self.strategy == "fsdp":
            raise ConfigError("several teachers (teacher.teachers) do not run under FSDP2 yet; set "
                              "distributed.strategy: ddp (each rank holds the teachers) or none")
        if self.strategy == "fsdp":
            self.module = apply_fsdp(pair, student.model.layers, teacher, env, cfg.distributed.shard_teacher,
                                     cfg.distributed.layers_per_unit)
            if env.is_main:
                print(f"FSDP2 over {env.world_size} ranks: "
                      f"{fsdp_layout(cfg.distributed.layers_per_unit, cfg.distributed.shard_teacher)}")
        elif self.strategy == "ddp":
            self.module = apply_ddp(pair, env)
        else:
            self.module = pair
        self.pair = unwrap(self.module)
        self.grad_scale = float(env.world_size) if self.strategy in ("fsdp", "ddp") else 1.0
        self.student = student

        # optimizer and schedule (after wrapping: FSDP2 replaces parameters by sharded ones)
        self.params = [p for p in student.parameters() if p.requires_grad]
        # (layer, mixer) of every trainable mixer parameter: gradients of mixers outside a step's
        # placement are dropped, so AdamW skips them (under FSDP2 they arrive as zeros, which
        # would still move them by their momentum)
        self.mixer_params: list[tuple[int, str, torch.nn.Parameter]] = []
        for name, p in student.named_parameters():
            parts = name.split(".")
            if p.requires_grad and "mixers" in parts and "layers" in parts:
                self.mixer_params.append((int(parts[parts.index("layers") + 1]), parts[parts.index("mixers") + 1], p))
        fused = cfg.train.fused_adamw == "true" or (cfg.train.fused_adamw == "auto" and dev.type == "cuda")
        self.optimizer = self._build_optimizer(student, fused=fused)
        # under FSDP2, clip and step on the local shards: no DTensor dispatch per op on the host
        self.local_shard_step = self.strategy == "fsdp" and self.skip_on_device and shards_are_disjoint(self.params)
        if self.strategy == "fsdp" and env.is_main:
            print("optimizer: " + ("fused AdamW and clipping on the local shards" if self.local_shard_step
                                   else "AdamW and clipping on DTensors"))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_schedule(cfg.train.warmup_steps, self.max_steps, cfg.train.min_lr_ratio))
        self.sampler = build_sampler(cfg.sampling, self.num_layers, cfg.seed, student.config.presets)
        self.eval_placements = resolve_placements(
            cfg.eval.placements, self.num_layers,
            {k: Placement.parse(v, self.num_layers) for k, v in student.config.presets.items()})
        self.step = 0
        self.tokens_seen = 0
        if env.is_main:
            for note in ckpt.clean_stale(self.out):
                print(note)
        env.barrier()
        self._resume()
        self._tb = None
        if cfg.log.tensorboard and env.is_main:  # the config check made sure tensorboard is installed
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tensorboard"))

    def _load_teachers(self, student: torch.nn.Module, dev: torch.device) -> list[tuple[str, Any]]:
        """(kind, frozen model or None) per entry of teacher.teachers; offline caches are opened by
        `_multi_data`. Every teacher must have the student's vocabulary (one-line error otherwise)."""
        cfg = self.cfg
        student_tok = _student_tokenizer(self.student_dir)
        frozen_bf16 = cfg.train.frozen_bf16 == "true" or (cfg.train.frozen_bf16 == "auto" and self.bf16)
        slots: list[tuple[str, Any]] = []
        for entry in cfg.teacher.teachers:
            if entry.source == "offline":
                slots.append(("offline", None))
                continue
            model, tok = load_teacher_model(entry.path, entry.gguf_file)
            check_models(cfg, student.config, model.config, entry.path)
            check_tokenizers(student_tok, tok, entry.path)
            cast_params(model, torch.bfloat16 if frozen_bf16 else torch.float32).to(dev)
            slots.append(("online", model))
        return slots

    def _multi_data(self, tokenizer: Any, data_cache: Path) -> tuple[Any, Any]:
        """(train, eval) datasets of a several-teacher run: the windows plus each offline teacher's top-K."""
        from supernet.training.logit_cache import CacheError, TopKCache
        from supernet.training.teachers import MultiTeacherData

        cfg, env = self.cfg, self.env
        entries = cfg.teacher.teachers
        train_caches, eval_caches = {}, {}
        for i, e in enumerate(entries):
            if e.source != "offline":
                continue
            train_caches[i] = TopKCache(e.cache_dir)
            train_caches[i].check_compatible(cfg.data.seq_len, cfg.loss.temperature, tokenizer)
            if e.eval_cache_dir:
                eval_caches[i] = TopKCache(e.eval_cache_dir)
                eval_caches[i].check_compatible(cfg.data.seq_len, cfg.loss.temperature, tokenizer)
        any_online = len(train_caches) < len(entries)

        def packed(files: list[str], progress: bool) -> PackedDataset:
            stream = build_token_stream(files, tokenizer, data_cache, cfg.data.format, cfg.data.separator,
                                        cfg.data.max_documents, env.is_main, env.barrier, progress)
            return PackedDataset(stream, cfg.data.seq_len)

        base = packed(cfg.data.train, cfg.log.progress and env.is_main) if any_online else next(iter(train_caches.values()))
        train = MultiTeacherData(base, train_caches)
        if len(train) == 0:
            raise CacheError("the several teachers' data share no window; check data.train and the caches")
        evaluation = None
        if any_online and cfg.data.eval:
            evaluation = MultiTeacherData(packed(cfg.data.eval, False), eval_caches)
        elif not any_online and eval_caches:
            evaluation = MultiTeacherData(next(iter(eval_caches.values())), eval_caches)
        return train, evaluation

    def _teacher_args(self, step: int | None) -> dict[str, Any]:
        """The forward's teacher arguments: {} for one teacher; else this step's active teachers
        (mix: all; alternate: the step's one; step None = evaluation: the mix of all)."""
        if not self.multi:
            return {}
        from supernet.training.teachers import active_teachers

        weights = [e.weight for e in self.cfg.teacher.teachers]
        return {"active": active_teachers(self.cfg.teacher.mode if step is not None else "mix", step or 0, weights)}

    def _param_groups(self, student: torch.nn.Module) -> list[dict[str, Any]]:
        """AdamW groups: per mixer (its LR scale) x decay (matrices) / no decay (norms, gates, biases)."""
        cfg = self.cfg.train
        groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
        for name, p in student.named_parameters():
            if not p.requires_grad:
                continue
            parts = name.split(".")
            mixer = parts[parts.index("mixers") + 1] if "mixers" in parts else "shared"
            groups.setdefault((mixer, p.ndim >= 2), []).append(p)
        out = []
        for (mixer, decay), params in sorted(groups.items()):
            scale = float(cfg.mixer_lr_scale.get(mixer, 1.0))
            out.append({"params": params, "lr": cfg.lr * scale, "weight_decay": cfg.weight_decay if decay else 0.0,
                        "name": f"{mixer}.{'decay' if decay else 'no_decay'}"})
        return out

    def _build_optimizer(self, student: torch.nn.Module, fused: bool) -> torch.optim.Optimizer:
        """AdamW, fused on CUDA (one kernel over all parameters; under FSDP2 one DTensor dispatch
        instead of one per foreach op), else the foreach/for-loop default; state created up front."""
        cfg = self.cfg.train
        self.skip_on_device = False
        if fused:
            try:
                self.optimizer = torch.optim.AdamW(self._param_groups(student), lr=cfg.lr,
                                                   betas=tuple(cfg.betas), fused=True)
                self._init_optimizer_state()
                self.skip_on_device = True
                return self.optimizer
            except (RuntimeError, NotImplementedError) as exc:  # a parameter type the fused kernel refuses
                print(f"warning: fused AdamW unavailable ({str(exc).splitlines()[0]}); using foreach")
        self.optimizer = torch.optim.AdamW(self._param_groups(student), lr=cfg.lr, betas=tuple(cfg.betas),
                                           **({"foreach": True} if fused else {}))
        self._init_optimizer_state()
        return self.optimizer

    @torch.no_grad()
    def _init_optimizer_state(self) -> None:
        """Create AdamW's state for every trainable parameter now, exactly as its first step would.

        Mixers that a run has not sampled yet would otherwise have no state, so a checkpoint's set
        of keys would depend on the sampled placements and could not be loaded into a fresh
        optimizer. A step with zero gradients and lr 0 creates the state; resetting `step` to 0
        makes it identical to AdamW's lazy initialisation.
        """
        saved = [g["lr"] for g in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["lr"] = 0.0
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        self.optimizer.step()
        for g, lr in zip(self.optimizer.param_groups, saved):
            g["lr"] = lr
            for p in g["params"]:
                p.grad = None
                st = self.optimizer.state[p]
                st["step"].zero_() if torch.is_tensor(st["step"]) else st.update(step=0)
                st["exp_avg"].zero_()
                st["exp_avg_sq"].zero_()

    def _resume(self) -> None:
        mode = self.cfg.checkpoint.resume
        if mode == "none":
            return
        path = ckpt.find_latest(self.out) if mode == "auto" else Path(mode)
        if path is None:
            return
        saved = ckpt.read_run_config(path)
        diffs = resume_differences(saved, self.cfg) if saved is not None else []
        if diffs and not self.cfg.checkpoint.resume_force:
            more = f" (and {len(diffs) - 1} more: {', '.join(d.split(' ')[0] for d in diffs[1:])})" if len(diffs) > 1 else ""
            raise ConfigError(f"resume refused: {diffs[0]}{more} since the checkpoint {path}; put it back, "
                              "use a new out_dir (or --resume none), or pass --resume-force to resume anyway")
        if diffs and self.env.is_main:
            print(f"warning: resuming with a changed run config (--resume-force): {'; '.join(diffs)}")
        state = ckpt.load_checkpoint(path, self.student, self.optimizer, self.env.rank)
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        if self.env.is_main:
            dropped = truncate_metrics(self.out / "metrics.jsonl", self.step)
            print(f"resumed from {path} at step {self.step}"
                  + (f"; dropped {dropped} metrics.jsonl records after it" if dropped else ""))

    # ------------------------------------------------------------------------------------------
    # one step
    # ------------------------------------------------------------------------------------------
    def next_placement(self) -> Placement:
        """The next sampled placement that runs at least one trainable mixer.

        A placement made only of frozen mixers (e.g. all-fa when fa is frozen) has nothing to train;
        such draws are skipped. Deterministic, so resumed and distributed runs agree.
        """
        for _ in range(1000):
            p = self.sampler.sample()
            if self.shared_trains or any(m in self.trained_mixers for m in p):
                return p
        raise ValueError("the sampler keeps drawing placements without a trainable mixer; "
                         "make sampling.mixers / sampling.presets overlap train.train_mixers")

    def precompile(self) -> float:
        """With train.compile: compile every training variant now, one forward + backward on the
        first micro-batch per placement that cycles through all mixers, gradients discarded (no
        optimizer step, no sampler draw, no random numbers: the run's results do not change).
        The first real step then runs at speed and no step compiles in the middle of a run.
        Returns the seconds spent (0 without train.compile)."""
        if not self.compiled_layers:
            return 0.0
        t0 = time.perf_counter()
        names = list(self.student.model.layers[0].mixers)
        n = self.num_layers
        batch = self.train_ds.get(self.order.micro_indices(self.step, 0))
        inputs = {**self._micro_inputs(batch, float(max(1, int(batch.mask.sum())))), **self._teacher_args(self.step)}
        for offset in range(0, len(names), n):
            placement = Placement.parse([names[(offset + i) % len(names)] for i in range(n)], n)
            with self._autocast():
                loss, _ = self.module(placement=placement, **inputs)
            loss.backward()
            self.optimizer.zero_grad(set_to_none=True)
        if self.env.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def _autocast(self):
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast(self.env.device.type, enabled=False)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host -> device copy. On CUDA through pinned memory and without blocking: a copy from
        pageable memory waits for the GPU to drain its queue (the previous optimizer step)."""
        dev = self.env.device
        if dev.type == "cuda":
            return t.pin_memory().to(dev, non_blocking=True)
        return t.to(dev)

    def _micro_inputs(self, batch, normaliser: float) -> dict[str, Any]:
        """Move a batch to the device; keep only weighted rows when many are masked."""
        flat = batch.mask.reshape(-1)
        rows = None
        if float(flat.mean()) < 0.9:
            rows = flat.nonzero().squeeze(1)
        topk = None
        if batch.extras and "topks" in batch.extras:  # several teachers: one top-K per offline teacher
            topks = {}
            for slot, ex in batch.extras["topks"].items():
                ids = ex["topk_ids"].reshape(-1, ex["topk_ids"].shape[-1])
                lps, tail = ex["topk_logprobs"].reshape(ids.shape), ex["topk_tail"].reshape(-1)
                if rows is not None:
                    ids, lps, tail = ids[rows], lps[rows], tail[rows]
                topks[slot] = TopKTargets(self._to_device(ids), self._to_device(lps), self._to_device(tail))
            return dict(input_ids=self._to_device(batch.input_ids),
                        token_weight=self._to_device(batch.mask / normaliser), labels=self._to_device(batch.labels),
                        rows=self._to_device(rows) if rows is not None else None, topks=topks)
        if batch.extras:
            ids = batch.extras["topk_ids"].reshape(-1, batch.extras["topk_ids"].shape[-1])
            lps = batch.extras["topk_logprobs"].reshape(ids.shape)
            tail = batch.extras["topk_tail"].reshape(-1)
            if rows is not None:
                ids, lps, tail = ids[rows], lps[rows], tail[rows]
            topk = TopKTargets(self._to_device(ids), self._to_device(lps), self._to_device(tail))
        return dict(input_ids=self._to_device(batch.input_ids), token_weight=self._to_device(batch.mask / normaliser),
                    labels=self._to_device(batch.labels), rows=self._to_device(rows) if rows is not None else None,
                    topk=topk)

    def train_step(self, placement: Placement) -> dict[str, float]:
        cfg, env = self.cfg, self.env
        count = self.train_ds.target_counts(self.order.step_indices(self.step))
        if count == 0:
            raise ValueError(f"step {self.step}: the global batch has no target tokens (check the data masks)")
        sums = torch.zeros(6, device=env.device)  # loss, kl, ce, hidden, act, stop requests (summed over ranks)
        teacher_args = self._teacher_args(self.step)
        for m in range(cfg.train.grad_accum):
            batch = self.train_ds.get(self.order.micro_indices(self.step, m))
            inputs = {**self._micro_inputs(batch, float(count)), **teacher_args}
            with gradient_sync(self.module, m == cfg.train.grad_accum - 1), self._autocast():
                loss, stats = self.module(placement=placement, **inputs)
            # token weights already normalise by the global batch, so rank gradients must be
            # summed; FSDP2 and DDP average them, hence the factor (a power of two is exact)
            (loss * self.grad_scale if self.grad_scale != 1 else loss).backward()
            sums[:5] += torch.stack([loss.detach().float(), stats["kl"].float(), stats["ce"].float(),
                                     stats["hidden"].float(), stats["act"].float()])
        if self.stop.requested:  # a signal arrived: every rank learns it in this step's all-reduce
            sums[5] += 1.0
        if cfg.stage != "transfer":  # stage transfer trains every trainable mixer, whatever the placement
            for layer, mixer, p in self.mixer_params:
                if placement[layer] != mixer:
                    p.grad = None
        clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        if self.local_shard_step:  # FSDP2: one all-reduce, then plain tensors (training/sharded_step.py)
            stats = torch.cat([sums, local_grad_square_sum(self.params).reshape(1).to(sums.device)])
            env.all_reduce_sum(stats)
            gnorm = stats[6].sqrt()
            clip_local_grads_(self.params, gnorm, clip)
            stats = torch.cat([stats[:5], gnorm.reshape(1), stats[5:6]])
            fused_adamw_local_step(self.optimizer, (~torch.isfinite(stats).all()).float())
            stepped = True
        else:
            env.all_reduce_sum(sums)
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, clip)
            if hasattr(gnorm, "full_tensor"):
                gnorm = gnorm.full_tensor()
            stats = torch.cat([sums[:5], gnorm.reshape(1).float().to(sums.device), sums[5:6]])
            stepped = self.skip_on_device and self._step_unless_nonfinite(stats)
        values = stats.tolist()  # the host waits for the GPU here
        loss_v, kl_v, ce_v, hid_v, act_v, gn_v, stop_votes = values
        self.stop_agreed = stop_votes > 0
        if not (math.isfinite(loss_v) and math.isfinite(gn_v)):
            self.optimizer.zero_grad(set_to_none=True)
            latest = ckpt.find_latest(self.out)
            raise TrainingDiverged(
                f"loss became {loss_v} (grad norm {gn_v}) at step {self.step} under placement "
                f"{placement.summary()}; the optimizer step was skipped, the weights are unchanged; "
                f"last good checkpoint: {latest or 'none'}; lower train.lr or check the data")
        lr = self.cfg.train.lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        if not stepped:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        rec = {"loss": loss_v, "kl": kl_v, "ce": ce_v, "hidden": hid_v, "act": act_v, "grad_norm": gn_v, "lr": lr}
        if self.multi and cfg.teacher.mode == "alternate":
            rec["teacher"] = teacher_args["active"][0][0]
        return rec

    def _step_unless_nonfinite(self, stats: torch.Tensor) -> bool:
        """Enqueue the fused AdamW step before the host reads the step's statistics.

        Fused AdamW reads `found_inf` on the device (as under a GradScaler) and leaves every weight
        and state untouched when it is set, so a NaN or inf still stops the run with the weights
        unchanged, without the host waiting for the GPU first. Waiting first left the GPU idle
        while the host dispatched the optimizer, which under FSDP2 is tens of milliseconds of
        DTensor work per step. Returns False (and stops trying) where a kernel refuses `found_inf`;
        the step then runs after the check, as before.
        """
        self.optimizer.found_inf = (~torch.isfinite(stats).all()).float()
        try:
            self.optimizer.step()
            return True
        except (RuntimeError, NotImplementedError) as exc:  # refused at dispatch: nothing was updated
            print(f"warning: the fused AdamW step refused a device-side skip ({str(exc).splitlines()[0]}); "
                  "checking the loss on the host before each step instead")
            self.skip_on_device = False
            return False
        finally:
            del self.optimizer.found_inf

    # ------------------------------------------------------------------------------------------
    # evaluation
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, placements: list[Placement] | None = None) -> dict[str, float]:
        """Mean per-token KL(teacher || student) at temperature 1 on the held-out windows
        (cross-entropy when the run has no teacher signal), per placement."""
        if self.eval_ds is None:
            return {}
        env, cfg = self.env, self.cfg
        n = len(eval_indices(len(self.eval_ds), cfg.eval.num_sequences))
        n -= n % env.world_size
        if n == 0:
            return {}
        mine = list(range(n))[env.rank::env.world_size]
        count = self.eval_ds.target_counts(range(n))
        offline = hasattr(self.eval_ds, "top_k")
        if self.multi:  # offline teachers' caches hold log-probs at loss.temperature (checked)
            offline = any(e.source == "offline" for e in cfg.teacher.teachers)
        if self.has_teacher:
            tau = (cfg.loss.temperature if self.multi else self.eval_ds.temperature) if offline else 1.0
            spec = LossSpec("fkl", tau, 1.0, 0.0, cfg.loss.chunk_tokens,
                            self.loss_spec.compiled)
        else:  # no teacher (e.g. SFT without distillation): held-out cross-entropy instead
            spec = LossSpec("fkl", 1.0, 0.0, 1.0, cfg.loss.chunk_tokens)
        key = "kl" if self.has_teacher else "ce"
        out: dict[str, float] = {}
        with eager_region(self.compiled_layers):  # no recompiles for eval shapes / no-grad mode
            for p in placements or self.eval_placements:
                out.update(self._evaluate_one(p, mine, count, spec, key))
        return out

    def _evaluate_one(self, p: Placement, mine: list[int], count: int, spec: LossSpec, key: str) -> dict[str, float]:
        env, cfg = self.env, self.cfg
        total = torch.zeros((), device=env.device)
        for s in range(0, len(mine), cfg.eval.batch_size):
            batch = self.eval_ds.get(mine[s: s + cfg.eval.batch_size])
            inputs = {**self._micro_inputs(batch, float(count)), **self._teacher_args(None)}
            with self._autocast():
                _, stats = self.module(placement=p, spec=spec, hidden_weight=0.0, **inputs)
            total += stats[key].float()
        env.all_reduce_sum(total)
        name = f"all-{p[0]}" if len(set(p)) == 1 else str(p)
        return {name: float(total)}

    # ------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if not self.env.is_main:
            return
        with (self.out / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, record["step"])
                elif isinstance(v, dict):
                    for kk, vv in v.items():
                        self._tb.add_scalar(f"{k}/{kk}", vv, record["step"])

    def save(self) -> Path:
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "scheduler": self.scheduler.state_dict(),
                 "sampler": self.sampler.state_dict()}
        return ckpt.save_checkpoint(self.out, self.step, self.student, self.optimizer, state, self.config_text,
                                    self.env.rank, self.env.barrier, self.cfg.checkpoint.keep_last)

    def save_final(self) -> Path:
        """The trained supernet as an HF folder (`<out_dir>/final`), loadable by every other part."""
        from supernet.convert import save_checkpoint
        from supernet.model import SupernetForCausalLM

        sd = ckpt.full_model_state(self.student)
        final = self.out / "final"
        if self.env.is_main:
            fresh = SupernetForCausalLM(self.student.config)
            fresh.load_state_dict(sd, strict=False)
            if fresh.config.tie_word_embeddings:
                fresh.tie_weights()
            save_checkpoint(fresh, final, self.tokenizer)
        self.env.barrier()
        return final

    @property
    def eval_key(self) -> str:
        return "eval_kl" if self.has_teacher else "eval_ce"

    def train(self, stop_at_step: int | None = None) -> TrainResult:
        """Run to max_steps (or stop after `stop_at_step` completed steps, as a crash would).

        SIGTERM / SIGINT / SIGUSR1 end the run after the current step with a checkpoint;
        `result.stopped_by` names the signal."""
        with self.stop:
            try:
                return self._train(stop_at_step)
            finally:
                if self._tb is not None:  # the writer flushes only every few minutes by itself
                    self._tb.flush()

    def _train(self, stop_at_step: int | None) -> TrainResult:
        cfg, env = self.cfg, self.env
        result = TrainResult(steps=self.step, eval_metric="KL" if self.has_teacher else "CE")
        from tqdm.auto import tqdm

        bar = tqdm(total=self.max_steps, initial=self.step, unit="step", desc=cfg.stage,
                   disable=not (cfg.log.progress and env.is_main), dynamic_ncols=True)
        if cfg.eval.at_start and self.step == 0 and self.eval_ds is not None:
            ev = self.evaluate()
            result.evals[0] = ev
            self._log({"step": 0, self.eval_key: ev})
        if self.compiled_layers and self.step < self.max_steps:
            secs = self.precompile()
            if env.is_main and cfg.log.progress:
                print(f"compiled the decoder layers in {secs:.1f} s")
        timed_tokens, timed_s = 0, 0.0
        window_tokens, window_t0 = 0, time.perf_counter()
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with ScheduledGC(cfg.train.gc_every) as collector:  # the same pause at the same step on every rank
            while self.step < self.max_steps:
                placement = self.next_placement()
                t0 = time.perf_counter()
                rec = self.train_step(placement)
                if env.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                timed_tokens += self.tokens_per_step
                timed_s += dt
                window_tokens += self.tokens_per_step
                result.losses[self.step] = rec["loss"]
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                record = {"step": self.step, **rec, "tokens": self.tokens_seen,
                          "tokens_per_s": self.tokens_per_step / dt, "placement": str(placement),
                          "epoch": round(self.order.epoch_of(self.step), 4)}
                if env.device.type == "cuda":
                    record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                self._log(record)
                bar.update(1)
                collector.step(self.step)
                if self.step % max(1, cfg.log.every) == 0 or self.step == self.max_steps:
                    rate = window_tokens / max(1e-9, time.perf_counter() - window_t0)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", kl=f"{rec['kl']:.4f}", tok_s=f"{rate:,.0f}")
                    window_tokens, window_t0 = 0, time.perf_counter()
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < self.max_steps:
                    ev = self.evaluate()
                    result.evals[self.step] = ev
                    self._log({"step": self.step, self.eval_key: ev})
                saved = None
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < self.max_steps:
                    saved = self.save()
                if self.stop_agreed and self.step < self.max_steps:
                    bar.close()
                    result.checkpoint = saved or self.save()
                    result.stopped_by = self.stop.signal_name or "a signal on another rank"
                    result.steps = self.step
                    result.tokens_per_s = timed_tokens / timed_s if timed_s else 0.0
                    return result
                if stop_at_step is not None and self.step >= stop_at_step:
                    bar.close()
                    result.steps = self.step
                    result.tokens_per_s = timed_tokens / timed_s if timed_s else 0.0
                    return result
        bar.close()
        if self.compiled_layers and env.is_main:  # a silent fallback to eager would only show as a slow run
            stats = compile_stats()
            print(f"torch.compile: {stats['unique_graphs']} graphs, {stats['graph_breaks']} graph breaks, "
                  f"{stats['failed_frames']} frames left eager, {stats['recompile_limit_hits']} recompile-limit hits")
        if cfg.eval.at_end and self.eval_ds is not None:
            ev = self.evaluate()
            result.evals[self.step] = ev
            self._log({"step": self.step, self.eval_key: ev})
        result.checkpoint = self.save()
        if cfg.checkpoint.save_final:
            result.final_dir = self.save_final()
        result.steps = self.step
        result.tokens_per_s = timed_tokens / timed_s if timed_s else 0.0
        return result


def _student_tokenizer(folder: Path) -> Any | None:
    """The tokenizer saved with the student, or None where the folder has none."""
    try:
        return load_tokenizer(str(folder))
    except (OSError, ValueError, TypeError):
        return None


def trained_parts(student: torch.nn.Module) -> tuple[set[str], bool]:
    """(mixers with a trainable parameter, whether a parameter outside the mixers trains)."""
    mixers, shared = set(), False
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        if "mixers" in parts:
            mixers.add(parts[parts.index("mixers") + 1])
        else:
            shared = True
    return mixers, shared


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the records after `step` (written after the checkpoint a run resumes from), atomically;
    returns how many were dropped. A torn last line (a crash mid-write) is dropped too."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and record.get("step", 0) > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped


def run(cfg: RunConfig) -> TrainResult:
    """Build a trainer, train, shut the process group down."""
    from supernet.training.distributed import shutdown

    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        shutdown(trainer.env)
