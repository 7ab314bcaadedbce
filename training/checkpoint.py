"""Atomic training checkpoints with exact resume.

Layout of `<out_dir>/checkpoints/step-00001200/`:
  state/              model + optimizer, written by torch.distributed.checkpoint (each rank writes
                      its own shard under FSDP2; a single process writes everything)
  trainer.pt          step, tokens seen, LR-scheduler state, placement-sampler state, metrics
  rng-rank{r}.pt      python / numpy / torch (CPU and CUDA) RNG states of rank r
  config.yaml         the run config, for reference

Atomicity: everything is written into `.tmp-step-...` first and fsynced (files and folders, so a
power loss cannot leave a renamed folder with empty files); after all ranks are done, rank 0
renames the folder (an atomic rename on one file system), fsyncs the parent, then deletes
checkpoints beyond `keep_last`. Re-saving an existing step moves the old copy aside
(`.old-step-...`) and deletes it only after the new one is in place. A crash mid-save leaves only a
`.tmp-*` / `.old-*` folder, which `find_latest` ignores and `clean_stale` tidies at the next start,
so the last complete checkpoint is always intact.

No pickle on load: every `.pt` file holds only tensors and plain containers (the numpy and Python
RNG states are stored as tensors), so it loads with `torch.load(weights_only=True)`; the
torch.distributed.checkpoint metadata and its non-tensor entries go through the same kind of
restricted loader (`_SafeReader`, `_SafeLoadPlanner`), which admits only DCP's own record types.
"""
from __future__ import annotations

import io
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
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
    """All RNG states as tensors and plain numbers (loadable with weights_only=True)."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (each rank flushes the pages it wrote)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_stale(out_dir: str | Path) -> list[str]:
    """Tidy what an interrupted save left: delete `.tmp-*` folders; an `.old-step-*` copy whose
    replacement never landed is renamed back, else deleted. Returns one note per action."""
    root = checkpoint_root(out_dir)
    notes: list[str] = []
    if not root.is_dir():
        return notes
    for p in sorted(root.iterdir()):
        if p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)
            notes.append(f"removed the unfinished save {p}")
        elif p.name.startswith(".old-"):
            final = root / p.name[len(".old-"):]
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
                notes.append(f"removed the replaced copy {p}")
            else:
                os.replace(p, final)
                notes.append(f"restored {final} (its re-save was interrupted)")
    if notes:
        _fsync_dir(root)
    return notes


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
    _fsync_tree(tmp)
    barrier()
    if rank == 0:
        old = root / f".old-step-{step:08d}"
        if final.exists():  # re-saving the same step (e.g. after a resume): keep it until the new one is in
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        if old.exists():
            shutil.rmtree(old)
        _prune(root, keep_last)
    barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)))
    for _, p in steps[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


_DCP_MODULE = "torch.distributed.checkpoint."


class _MetadataUnpickler(pickle.Unpickler):
    """Reads DCP's `.metadata` admitting only DCP's record types, torch.Size / dtypes and plain
    containers: the restricted-unpickler idea of `weights_only=True`, for DCP's own index file."""

    _ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
                ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(_DCP_MODULE) or (module, name) in self._ALLOWED or \
                (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not a DCP record type")


class _SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        rank = kwargs.get("rank")
        with self.fs.create_stream(self._get_metadata_path(rank), "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner loads non-tensor entries (optimizer param groups) with
    weights_only=False; these are plain numbers and strings, so weights_only=True suffices."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    rank: int = 0, restore_rng: bool = True) -> dict[str, Any]:
    """Restore model and optimizer in place (collective under torchrun); return the trainer state."""
    path = Path(path)
    if not (path / "trainer.pt").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer.pt); pick another or resume: none")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, storage_reader=_SafeReader(str(path / "state")), planner=_SafeLoadPlanner())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng-rank{rank}.pt"
    if restore_rng and rng_file.is_file():
        set_rng_state(_load_pt(rng_file))
    return _load_pt(path / "trainer.pt")


def _load_pt(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:  # written by an older version with pickled numpy state
        raise ValueError(f"{path} holds pickled objects (a checkpoint from before the pickle-free format); "
                         "resume it with the version that wrote it, or start fresh with --resume none") from exc


def read_run_config(path: str | Path) -> dict[str, Any] | None:
    """The resolved run config saved with a checkpoint, or None when absent or not a mapping."""
    import yaml

    f = Path(path) / "config.yaml"
    if not f.is_file():
        return None
    try:
        data = yaml.safe_load(f.read_text())
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on CPU, on rank 0 (collective under FSDP2)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
