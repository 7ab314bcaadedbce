"""Measure the quality of a placement against a teacher (the torch half of the evaluation; the
campaign that decides which placements to measure is supernet.placement.evaluate, pure numpy).

Quality of a placement p on held-out text:

    quality = 1 - KL(teacher || p) / KL(teacher || uniform)

averaged over every predicted token (ratio of sums). It is 1 for the teacher itself, 0 for a model
that knows nothing (uniform over the vocabulary), and the denominator is one constant per data set,
so qualities are comparable across placements and runs on the same data. Top-1 agreement (student's
argmax = teacher's argmax) is reported too.

The teacher's distributions are computed once and reused for every placement. Keeping them whole
would take vocab x tokens x 4 bytes (49152 x 16k tokens = 3 GB), so by default only the teacher's
top-k log-probs and the mass of the rest are kept; the KL is then that of the coarsened distributions
(top-k tokens + one "rest" bucket), a lower bound on the full KL that is exact when the rest is
negligible. `top_k=0` recomputes the teacher for every placement and uses the full vocabulary.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from supernet.layout import Placement, PlacementError
from supernet.measure.timer import Stopwatch
from supernet.placement.evaluate import METRIC, load_texts


def make_sequences(tokenizer: Any, texts: Sequence[str], seq_len: int, num_sequences: int) -> torch.Tensor:
    """Pack the texts (separated by EOS) into `num_sequences` rows of `seq_len` tokens, no padding.

    The supernet refuses padded batches (linear mixers carry state across positions), and equal rows
    also make every placement see exactly the same tokens.
    """
    if seq_len < 2 or num_sequences < 1:
        raise PlacementError("--seq-len must be >= 2 and --sequences >= 1")
    eos = tokenizer.eos_token_id
    need = seq_len * num_sequences
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= need:
            break
    rows = min(num_sequences, len(ids) // seq_len)
    if rows == 0:
        raise PlacementError(f"the data have only {len(ids)} tokens, fewer than one sequence of {seq_len}; "
                             "lower --seq-len or give more text")
    return torch.tensor(ids[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


def data_fingerprint(ids: torch.Tensor) -> str:
    """Short hash of the evaluated tokens: rows measured on different tokens must not be mixed."""
    return hashlib.sha1(ids.cpu().numpy().astype(np.int64).tobytes()).hexdigest()[:12]


# -- teacher targets and the KL -------------------------------------------------------------------
@dataclass
class TeacherTopK:
    """Per token: the teacher's top-k log-probs and their token ids, and log of the remaining mass."""

    logp: torch.Tensor  # [S, T, k] float32
    index: torch.Tensor  # [S, T, k] int64 (column 0 = teacher argmax)
    log_rest: torch.Tensor  # [S, T] float32
    kl_uniform: float  # sum over tokens of KL(teacher || uniform), coarsened the same way
    vocab_size: int


def _log_rest(logp_top: torch.Tensor) -> torch.Tensor:
    mass = torch.logsumexp(logp_top, dim=-1).exp().clamp(max=1.0 - 1e-7)
    return torch.log1p(-mass).clamp(min=-60.0)


def _coarse_kl_uniform(logp: torch.Tensor, log_rest: torch.Tensor, vocab: int) -> torch.Tensor:
    k = logp.shape[-1]
    top = (logp.exp() * (logp + math.log(vocab))).sum(-1)
    rest = log_rest.exp() * (log_rest - math.log((vocab - k) / vocab)) if vocab > k else 0.0
    return top + rest


def coarse_kl(student_logits: torch.Tensor, t_logp: torch.Tensor, t_index: torch.Tensor,
              t_log_rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL(teacher || student) over teacher's top-k + rest bucket, and top-1 agreement."""
    s_logp = torch.log_softmax(student_logits.float(), dim=-1)
    s_top = s_logp.gather(-1, t_index)
    s_rest = _log_rest(s_top)
    kl = (t_logp.exp() * (t_logp - s_top)).sum(-1) + t_log_rest.exp() * (t_log_rest - s_rest)
    agree = s_logp.argmax(-1) == t_index[..., 0]
    return kl.clamp(min=0.0), agree


def full_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-token exact KL(teacher || student), KL(teacher || uniform) and top-1 agreement."""
    s = torch.log_softmax(student_logits.float(), dim=-1)
    t = torch.log_softmax(teacher_logits.float(), dim=-1)
    p = t.exp()
    kl = (p * (t - s)).sum(-1)
    kl_u = (p * t).sum(-1) + math.log(t.shape[-1])
    return kl.clamp(min=0.0), kl_u, s.argmax(-1) == t.argmax(-1)


LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def teacher_topk(teacher: LogitsFn, ids: torch.Tensor, top_k: int, batch_size: int,
                 progress: bool = True) -> TeacherTopK:
    """Run the teacher once over all sequences and keep its top-k (on the CPU)."""
    from tqdm.auto import tqdm

    logps, idxs, rests = [], [], []
    kl_u = 0.0
    vocab = None
    with torch.inference_mode():
        for start in tqdm(range(0, len(ids), batch_size), desc="teacher", disable=not progress):
            logits = teacher(ids[start:start + batch_size]).float()
            vocab = logits.shape[-1]
            lp = torch.log_softmax(logits, dim=-1)
            vals, idx = lp.topk(min(top_k, vocab), dim=-1)
            rest = _log_rest(vals)
            kl_u += float(_coarse_kl_uniform(vals, rest, vocab).sum())
            logps.append(vals.cpu())
            idxs.append(idx.cpu())
            rests.append(rest.cpu())
            del logits, lp
    return TeacherTopK(torch.cat(logps), torch.cat(idxs), torch.cat(rests), kl_u, int(vocab))


class PlacementEvaluator:
    """Callable: placement -> evaluation row (quality, KL, agreement...), reusing the teacher targets."""

    def __init__(self, student: Callable[[torch.Tensor, Placement], torch.Tensor], ids: torch.Tensor,
                 teacher: LogitsFn, top_k: int = 64, batch_size: int = 4, reference: str = "all-fa",
                 device: Any = "cpu", progress: bool = True) -> None:
        self.student, self.teacher, self.ids = student, teacher, ids
        self.top_k, self.batch_size, self.reference, self.device = top_k, batch_size, reference, device
        self.data_id = data_fingerprint(ids)
        self.targets = teacher_topk(teacher, ids.to(device), top_k, batch_size, progress) if top_k > 0 else None
        self.metric = f"{METRIC}@top{top_k}" if top_k > 0 else f"{METRIC}@full"

    def __call__(self, placement: Placement) -> dict:
        kl_sum, klu_sum, agree_sum, tokens = 0.0, 0.0, 0, 0
        with torch.inference_mode(), Stopwatch(self.device) as watch:
            for start in range(0, len(self.ids), self.batch_size):
                batch = self.ids[start:start + self.batch_size].to(self.device)
                logits = self.student(batch, placement)
                if self.targets is not None:
                    sl = slice(start, start + len(batch))
                    dev = logits.device
                    kl, agree = coarse_kl(logits, self.targets.logp[sl].to(dev), self.targets.index[sl].to(dev),
                                          self.targets.log_rest[sl].to(dev))
                else:
                    kl, klu, agree = full_kl(logits, self.teacher(batch))
                    klu_sum += float(klu.sum())
                kl_sum += float(kl.sum())
                agree_sum += int(agree.sum())
                tokens += kl.numel()
                del logits
        if self.targets is not None:
            klu_sum = self.targets.kl_uniform
        kl_mean, klu_mean = kl_sum / tokens, klu_sum / tokens
        return {
            "placement": placement.to_list(),
            "quality": 1.0 - kl_mean / klu_mean,
            "metric": self.metric,
            "kl": kl_mean,
            "kl_uniform": klu_mean,
            "top1_agreement": agree_sum / tokens,
            "tokens": tokens,
            "reference": self.reference,
            "data_id": self.data_id,
            "seconds": round(watch.seconds, 3),
        }


# -- loading the model and the teacher ------------------------------------------------------------
def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_supernet(path: str | Path, device: torch.device) -> Any:
    """SupernetForCausalLM in eval mode on `device` (bf16 on CUDA, fp32 on CPU, which is faster there)."""
    from supernet.model import SupernetForCausalLM

    path = Path(path)
    if not (path / "config.json").exists():
        raise PlacementError(f"{path} is not a supernet checkpoint (no config.json); give the folder from "
                             "`supernet convert` or training")
    model = SupernetForCausalLM.from_pretrained(str(path))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).eval()


def build_evaluator(ckpt: str | Path, data: str | Path, seq_len: int = 256, sequences: int = 16,
                    top_k: int = 64, batch_size: int = 4, teacher_path: str | None = None,
                    gguf_file: str | None = None, device: str | None = None,
                    progress: bool = True) -> tuple[PlacementEvaluator, Any]:
    """Model, tokenised data and teacher targets, ready to evaluate placements."""
    from transformers import AutoTokenizer

    dev = pick_device(device)
    model = load_supernet(ckpt, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    except (OSError, ValueError) as exc:
        raise PlacementError(f"no tokenizer in {ckpt} ({str(exc).splitlines()[0]}); save one with the checkpoint") from None
    ids = make_sequences(tokenizer, load_texts(data), seq_len, sequences)

    def student(batch, placement):
        return model(input_ids=batch, placement=placement, use_cache=False).logits

    if teacher_path is None:
        # the checkpoint's own copy of the teacher: all-fa, or swa on a sliding teacher's sliding layers
        own = Placement.parse(model.config.teacher_placement(), model.config.num_hidden_layers)
        teacher = lambda batch: student(batch, own)  # noqa: E731
        reference = "all-fa (checkpoint)" if set(own) == {"fa"} else "teacher placement (checkpoint)"
    else:
        from supernet.teacher import load_teacher

        tmodel, _ = load_teacher(teacher_path, gguf_file=gguf_file)
        tmodel = tmodel.to(device=dev, dtype=next(model.parameters()).dtype).eval()
        if tmodel.config.vocab_size != model.config.vocab_size:
            raise PlacementError(f"teacher vocabulary ({tmodel.config.vocab_size}) differs from the checkpoint's "
                                 f"({model.config.vocab_size}); use the teacher the supernet was made from")
        teacher = lambda batch: tmodel(input_ids=batch, use_cache=False).logits  # noqa: E731
        reference = f"teacher {Path(teacher_path).name}" + (f" ({gguf_file})" if gguf_file else "")
    evaluator = PlacementEvaluator(student, ids, teacher, top_k, batch_size, reference, dev, progress)
    return evaluator, model
