"""Process-group setup and model wrapping: one process, DDP, or FSDP2 (`fully_shard`).

The same command runs alone or under `torchrun`: RANK / WORLD_SIZE / LOCAL_RANK in the environment
switch distribution on. FSDP2 shards every decoder layer of the student *and of the teacher* (each
layer is one all-gather unit), then the pair module as the root, whose own parameters (embeddings,
final norms, lm_heads) stay gathered during its forward — which is where the fused lm_head loss runs.
FSDP2 works on CPU with gloo in torch >= 2.6 (checked on 2.13), so CPU tests exercise the same path.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_object(self, obj):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device: str = "auto", backend: str = "auto") -> DistEnv:
    """Start the process group when launched by torchrun; pick the device of this rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no CUDA device is visible; set train.device: cpu")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world == 1:
        return DistEnv(0, 1, 0, dev, None)
    be = ("nccl" if use_cuda else "gloo") if backend == "auto" else backend
    if not dist.is_initialized():
        dist.init_process_group(be, timeout=datetime.timedelta(minutes=30),
                                device_id=dev if be == "nccl" else None)
    return DistEnv(rank, world, local, dev, be)


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def resolve_strategy(strategy: str, env: DistEnv) -> str:
    if strategy == "auto":
        return "fsdp" if env.distributed else "none"
    if strategy in ("fsdp", "ddp") and not env.distributed:
        return "none"
    return strategy


def apply_fsdp(pair: nn.Module, student_layers: nn.ModuleList, teacher: nn.Module | None, env: DistEnv,
               shard_teacher: bool = True, layers_per_unit: int = 0) -> nn.Module:
    """FSDP2 units, shaped by what one step of stochastic distillation touches:

    - `layers_per_unit=0`: every mixer of every student layer is its own unit, so a step all-gathers
      only the mixers its placement uses (a quarter of the mixer weights), and keeps them gathered
      from forward to backward (`reshard_after_forward=False`: no second all-gather in backward);
    - `layers_per_unit=K`: K consecutive student layers form one unit (their trainable weights, all
      mixers included), and K teacher layers one teacher unit. A step then gathers more bytes in
      fewer collectives: each collective is a point where the ranks wait for each other, which can
      cost more than the bytes for a small model on NVLink. Every layer runs in every step, so every
      member of a unit runs its forward (FSDP2's grouped hooks need that in older torch releases);
    - frozen student weights (the shared embeddings, norms and MLPs under the default `trainable:
      mixers`) are left out of FSDP (`ignored_params`): they need no gradient reduction, and
      replicating them on every rank saves gathering them twice per step;
    - each teacher layer and the teacher's remaining weights are units (the teacher is sharded), or,
      with `shard_teacher=False`, every rank holds the whole frozen teacher and gathers nothing for it;
    - the pair is the root (whatever student weights are still trainable and outside a layer).

    Measured on 2 x H200, eager, teacher sharded (benchmarks/results/training_fsdp2_2gpu*.json):
    scaling efficiency 0.89 with per-mixer units, 0.90 with K=6 and 0.95 with the whole 30-layer
    model as one unit, once the optimizer stopped dispatching through DTensor
    (training/sharded_step.py).

    Parameters are all-gathered in their stored dtype (fp32 for the student) and compute runs under
    the same bf16 autocast as a single-GPU run, so one and N GPUs give the same numbers. The
    teacher's root unit is not called through its own forward (we need its final hidden states and
    lm_head separately), so `DistillPair` unshards / reshards it explicitly.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if layers_per_unit < 0:
        raise ValueError(f"layers_per_unit must be >= 0 (0: one unit per mixer), got {layers_per_unit}")
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    teacher_params = set(teacher.parameters()) if teacher is not None else set()
    if teacher is not None and shard_teacher:
        for chunk in _chunks(list(teacher.model.layers), max(1, layers_per_unit)):
            fully_shard(chunk if len(chunk) > 1 else chunk[0], mesh=mesh)
        fully_shard(teacher, mesh=mesh)
    frozen = {p for p in pair.parameters() if not p.requires_grad and (p not in teacher_params or not shard_teacher)}
    if layers_per_unit:
        for chunk in _chunks(list(student_layers), layers_per_unit):
            params = {p for layer in chunk for p in layer.parameters()}
            if any(p.requires_grad for p in params):
                fully_shard(chunk if len(chunk) > 1 else chunk[0], mesh=mesh, reshard_after_forward=False,
                            ignored_params=frozen & params)
    else:
        for layer in student_layers:
            in_mixer_units: set[nn.Parameter] = set()
            for mixer in getattr(layer, "mixers", {}).values():
                if any(p.requires_grad for p in mixer.parameters()):
                    fully_shard(mixer, mesh=mesh, reshard_after_forward=False,
                                ignored_params=frozen & set(mixer.parameters()))
                    in_mixer_units |= set(mixer.parameters())
            own = {p for p in layer.parameters() if p not in in_mixer_units}
            if any(p.requires_grad for p in own):  # shared weights train too (`train.trainable: all`)
                fully_shard(layer, mesh=mesh, ignored_params=frozen & own)
    fully_shard(pair, mesh=mesh, ignored_params=frozen)
    return pair


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def fsdp_layout(layers_per_unit: int, shard_teacher: bool) -> str:
    """One line for the log: how the model was cut into FSDP2 units."""
    student = ("one unit per trainable mixer" if layers_per_unit == 0
               else f"one unit per {layers_per_unit} layer{'s' if layers_per_unit > 1 else ''}")
    return f"{student}, frozen student weights replicated, teacher {'sharded' if shard_teacher else 'replicated'}"


def apply_ddp(pair: nn.Module, env: DistEnv) -> nn.Module:
    """DDP fallback; unused mixers (not in this step's placement) need find_unused_parameters."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(pair, device_ids=ids, find_unused_parameters=True)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(sync)
        yield
    elif hasattr(module, "no_sync") and not sync:  # DDP
        with module.no_sync():
            yield
    else:
        yield


def unwrap(module: nn.Module) -> nn.Module:
    """The pair module under a DDP wrapper (FSDP2 keeps the module itself)."""
    return module.module if hasattr(module, "no_sync") and hasattr(module, "module") else module
