"""A ready tiny training setup for the tests: teacher, converted student, text and chat corpora."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from supernet.training.tiny import (synthetic_chats, tiny_student_overrides, tiny_teacher_dir, write_jsonl,
                                    write_synthetic_corpus)


class TinyWorld:
    """Paths of a ready tiny setup: teacher folder, converted student, text and chat corpora."""

    def __init__(self, root: str | Path, n_train: int = 120, n_eval: int = 16) -> None:
        from supernet.convert import save_checkpoint, supernet_from_teacher
        from supernet.training.models import load_teacher_model

        self.root = Path(root)
        self.train, self.eval = write_synthetic_corpus(self.root / "data", n_train, n_eval)
        self.chat = write_jsonl(self.root / "data" / "chat.jsonl", [{"messages": m} for m in synthetic_chats(40, 3)])
        self.teacher_dir = tiny_teacher_dir()
        self.student_dir = self.root / "student-init"
        if not (self.student_dir / "config.json").exists():
            teacher, tok = load_teacher_model(str(self.teacher_dir))
            torch.manual_seed(0)
            save_checkpoint(supernet_from_teacher(teacher, **tiny_student_overrides()), self.student_dir, tok)

    def config(self, out_dir: str | Path, **sections: dict[str, Any]):
        """A small CPU RunConfig for this world; `sections` update the defaults key by key."""
        from supernet.training.config import config_from_dict

        base: dict[str, Any] = {
            "out_dir": str(out_dir),
            "teacher": {"source": "online", "path": str(self.teacher_dir)},
            "student": {"path": str(self.student_dir)},
            "data": {"train": [str(self.train)], "eval": [str(self.eval)], "seq_len": 32,
                     "cache_dir": str(self.root / "data-cache")},
            "loss": {"chunk_tokens": 100},
            "train": {"micro_batch_size": 2, "grad_accum": 2, "max_steps": 6, "lr": 3e-3, "warmup_steps": 2,
                      "device": "cpu"},
            "eval": {"every": 0, "num_sequences": 4, "batch_size": 4, "at_start": False, "at_end": False},
            "checkpoint": {"every": 0, "keep_last": 3, "save_final": False},
            "log": {"progress": False},
        }
        for key, value in sections.items():
            base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
        return config_from_dict(base)
