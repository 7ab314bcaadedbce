"""Atomic training checkpoints with exact resume.

Layout of `<out_dir>/checkpoints/step-00001200/`:
  state/              model + optimizer, written by torch.distributed.checkpoint (each rank writes
                      its own shard under FSDP2; a single process writes everything)
  trainer.pt          step, tokens seen, LR-scheduler state, placement-sampler state, metrics
  rng-rank{r}.pt      python / numpy / torch (CPU and CUDA) RNG states of rank r
  config.yaml         the run config, for reference

Atomicity: everything is written into `.tmp-step-...` first; after all ranks are done, rank 0
renames the folder (an atomic rename on one file system), then deletes checkpoints beyond
`keep_last`. A crash mid-save leaves only a `.tmp-*` folder, which `find_latest` ignores, so the
last complete checkpoint is always intact.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def find_latest(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir())
    return steps[-1][1] if steps else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    config_text: str,
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
    keep_last: int = 3,
) -> Path:
    """Write a checkpoint of `model` (the student) and `optimizer`; collective under torchrun."""
    root = checkpoint_root(out_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "state"))
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    if rank == 0:
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "config.yaml").write_text(config_text)
    barrier()
    if rank == 0:
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, keep_last)
    barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)))
    for _, p in steps[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    rank: int = 0, restore_rng: bool = True) -> dict[str, Any]:
    """Restore model and optimizer in place (collective under torchrun); return the trainer state."""
    path = Path(path)
    if not (path / "trainer.pt").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer.pt); pick another or resume: none")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path / "state"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng-rank{rank}.pt"
    if restore_rng and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return torch.load(path / "trainer.pt", weights_only=False)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on CPU, on rank 0 (collective under FSDP2)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
