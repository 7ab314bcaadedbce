"""Load the teacher, the tokenizer and the student for a run.

The student is a supernet checkpoint; without one, the teacher is converted first (rank 0 writes
`<out_dir>/student-init`, the other ranks wait and load it), so every rank starts from identical
weights even if conversion draws random numbers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

BUILTIN_TINY = "builtin:tiny-llama"


def teacher_location(path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """`builtin:tiny-llama` -> the cached tiny teacher folder; anything else unchanged."""
    if path == BUILTIN_TINY:
        from supernet.training.tiny import tiny_teacher_dir

        return str(tiny_teacher_dir()), None
    return path, gguf_file


def load_teacher_model(path: str, gguf_file: str | None = None) -> tuple[nn.Module, Any]:
    """(frozen LlamaForCausalLM in eval mode, tokenizer)."""
    from supernet.teacher import load_teacher

    loc, gguf = teacher_location(path, gguf_file)
    model, tokenizer = load_teacher(loc, gguf)
    model.requires_grad_(False)
    return model.eval(), tokenizer


def cast_params(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast parameters only. `model.to(dtype)` would also round buffers such as RoPE's inverse
    frequencies to bf16, which shifts the rotary angle by radians at position 2048."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def prepare_student(student_path: str | None, out_dir: str | Path, teacher: nn.Module | None,
                    teacher_tokenizer: Any, overrides: dict[str, Any], is_main: bool,
                    barrier: Callable[[], None]) -> Path:
    """The student checkpoint folder to load: the configured one, or a fresh conversion."""
    if student_path is not None:
        p = Path(student_path)
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"student checkpoint {p} has no config.json; run `supernet convert` first")
        return p
    out = Path(out_dir) / "student-init"
    if is_main and not (out / "config.json").is_file():
        if teacher is None:
            raise ValueError("student.path is not set and there is no teacher model to convert")
        from supernet.convert import save_checkpoint, supernet_from_teacher

        save_checkpoint(supernet_from_teacher(teacher, **overrides), out, teacher_tokenizer)
    barrier()
    return out


def load_student(path: str | Path) -> nn.Module:
    import supernet.model  # noqa: F401  (registers the Auto classes for model_type "supernet")
    from supernet.model import SupernetForCausalLM

    return SupernetForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def set_trainable(student: nn.Module, trainable: str, train_mixers: list[str]) -> list[str]:
    """Freeze everything except what trains; return the names of the trainable parameters.

    `trainable`: "all", "mixers" (the mixers in `train_mixers`), or a selection file (`supernet snr`):
    exactly the parameters it lists train."""
    from supernet.training.config import is_selection_file

    if is_selection_file(trainable):
        return _set_trainable_from_file(student, trainable, train_mixers)
    names = []
    for name, p in student.named_parameters():
        if trainable == "all":
            keep = True
        else:
            parts = name.split(".")
            keep = "mixers" in parts and parts[parts.index("mixers") + 1] in train_mixers
        p.requires_grad_(keep)
        if keep:
            names.append(name)
    if not names:
        raise ValueError("no parameter is trainable; check train.trainable and train.train_mixers")
    return names


def _set_trainable_from_file(student: nn.Module, path: str, train_mixers: list[str]) -> list[str]:
    """Unfreeze exactly the parameters a selection file lists (tied aliases such as lm_head.weight
    of a tied model name the embedding they share); one-line ConfigErrors for unknown names."""
    from supernet.snr import SNRError, read_selection
    from supernet.training.config import ConfigError

    try:
        listed = read_selection(Path(path))
    except SNRError as exc:
        raise ConfigError(str(exc)) from None
    by_name = dict(student.named_parameters(remove_duplicate=False))
    unknown = [n for n in listed if n not in by_name]
    if unknown:
        raise ConfigError(f"train.trainable {path} lists {len(unknown)} parameter(s) this student does not have, "
                          f"e.g. {unknown[0]!r}; write the file from this checkpoint with `supernet snr`")
    for name in listed:
        parts = name.split(".")
        if "mixers" in parts and parts[parts.index("mixers") + 1] not in train_mixers:
            raise ConfigError(f"train.trainable {path} lists {name}, but its mixer is not in train.train_mixers "
                              f"({', '.join(train_mixers)}); add it there or drop it from the file")
    chosen = {id(by_name[n]) for n in listed}
    names = []
    for name, p in student.named_parameters():
        keep = id(p) in chosen
        p.requires_grad_(keep)
        if keep:
            names.append(name)
    return names
