"""Offline teacher signals: the teacher's top-K log-probabilities per token, on disk.

Running the teacher once and reusing its outputs across many student runs (or epochs) removes the
teacher forward from training. The cache is made over the *packed windows* of the data (same
tokenizer, seq_len and packing as training), and stores the windows themselves, so it is its own
dataset: training from it cannot misalign tokens and teacher signals.

Layout of the cache folder:
  index.json                 format, version, top_k, temperature, seq_len, vocab_size, dtypes,
                             bytes_per_token, num_sequences, shards [{file, start, count}], teacher,
                             tokenizer fingerprint, source data, throughput
  shard-00000.safetensors    per window (S windows of T tokens, top-K = K):
      tokens         [S, T+1] int32   inputs plus the final target
      targets        [S, T]   uint8   1 where the prediction at t counts (document boundaries)
      topk_ids       [S, T, K] uint16 (vocab <= 65536) or int32
      topk_logprobs  [S, T, K] float16 (default) or float32, log-softmax(z / temperature)
      tail           [S, T]   float32  1 - sum(exp(topk_logprobs)), from the unrounded values
  tokenizer/                 the tokenizer, so the cache is self-describing

Shards are written atomically (temp file + rename) and skipped when already complete, so an
interrupted `cache-logits` resumes; under torchrun, rank r writes shards r, r + world, ...
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from supernet.io_utils import atomic_write_text
from supernet.training.data import Batch, PackedDataset, build_token_stream, tokenizer_fingerprint

FORMAT = "supernet-topk-logits"
VERSION = 1


class CacheError(ValueError):
    """A cache that cannot be used as asked; the message names the mismatch and the fix."""


def bytes_per_token(top_k: int, vocab_size: int, values_dtype: str) -> float:
    ids = 2 if vocab_size <= 65536 else 4
    vals = 2 if values_dtype == "float16" else 4
    return top_k * (ids + vals) + 4 + 1 + 4  # + tail (fp32), target mask (u8), token (int32)


@torch.no_grad()
def teacher_topk(teacher: torch.nn.Module, input_ids: torch.Tensor, top_k: int, temperature: float,
                 chunk_tokens: int = 4096, autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher top-K (ids, log-probs, tail mass) for every position of `input_ids` [B, T].

    The lm_head is applied chunk by chunk to the final hidden states, so full-vocabulary logits
    exist for one chunk at a time.
    """
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        h = teacher.model(input_ids=input_ids, use_cache=False).last_hidden_state
    b, t, d = h.shape
    h = h.reshape(-1, d)
    w = teacher.lm_head.weight
    cd = torch.bfloat16 if autocast else w.dtype
    w_c = w.to(cd)
    ids_out, lp_out, tail_out = [], [], []
    for s in range(0, h.shape[0], chunk_tokens):
        z = (h[s: s + chunk_tokens].to(cd) @ w_c.t()).float()
        logp = torch.log_softmax(z / temperature, dim=-1)
        vals, ids = logp.topk(top_k, dim=-1)
        ids_out.append(ids)
        lp_out.append(vals)
        tail_out.append((1.0 - vals.exp().sum(-1)).clamp_min(0.0))
    k = top_k
    return (torch.cat(ids_out).reshape(b, t, k), torch.cat(lp_out).reshape(b, t, k),
            torch.cat(tail_out).reshape(b, t))


def write_logit_cache(
    teacher: torch.nn.Module,
    tokenizer: Any,
    data: Sequence[str],
    out_dir: str | Path,
    *,
    top_k: int = 32,
    seq_len: int = 2048,
    temperature: float = 1.0,
    batch_size: int = 8,
    shard_sequences: int = 256,
    values_dtype: str = "float16",
    data_format: str = "auto",
    separator: str = "eos",
    max_documents: int | None = None,
    max_sequences: int | None = None,
    device: torch.device | str = "cpu",
    teacher_name: str = "",
    rank: int = 0,
    world_size: int = 1,
    barrier=lambda: None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the teacher over the packed data and write the cache; returns the index."""
    from tqdm.auto import tqdm

    if values_dtype not in ("float16", "float32"):
        raise CacheError(f"values dtype {values_dtype!r} is not supported; use float16 or float32")
    vocab = teacher.config.vocab_size
    if not 1 <= top_k <= vocab:
        raise CacheError(f"--top-k {top_k} must lie in 1..{vocab} (the vocabulary size)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stream = build_token_stream(data, tokenizer, out / ".data-cache", data_format, separator, max_documents,
                                is_main=rank == 0, barrier=barrier, progress=progress and rank == 0)
    ds = PackedDataset(stream, seq_len)
    n = ds.num_windows if max_sequences is None else min(ds.num_windows, max_sequences)
    shards = [(i, s, min(shard_sequences, n - s)) for i, s in enumerate(range(0, n, shard_sequences))]
    teacher = teacher.to(device).eval()
    on_cuda = torch.device(device).type == "cuda"
    ids_dtype = torch.int32 if vocab > 65536 else torch.uint16
    vdt = torch.float16 if values_dtype == "float16" else torch.float32
    mine = [sh for sh in shards if sh[0] % world_size == rank]
    t0 = time.perf_counter()
    done_tokens = 0
    bar = tqdm(total=sum(c for _, _, c in mine) * seq_len, unit="tok", unit_scale=True,
               desc="teacher top-K", disable=not (progress and rank == 0))
    for idx, start, count in mine:
        path = out / f"shard-{idx:05d}.safetensors"
        if path.is_file() and _shard_count(path) == count:
            bar.update(count * seq_len)
            continue
        toks, tgts, ids_l, lps_l, tails_l = [], [], [], [], []
        for s in range(start, start + count, batch_size):
            batch = ds.get(range(s, min(start + count, s + batch_size)))
            x = batch.input_ids.to(device)
            ids, lps, tail = teacher_topk(teacher, x, top_k, temperature, autocast=on_cuda)
            full = torch.stack([torch.from_numpy(ds.window(i)[0]) for i in batch.index.tolist()])
            toks.append(full.to(torch.int32))
            tgts.append(batch.mask.to(torch.uint8))
            ids_l.append(ids.cpu().to(torch.int32).to(ids_dtype))
            lps_l.append(lps.cpu().to(vdt))
            tails_l.append(tail.cpu().float())
            bar.update(x.numel())
            done_tokens += x.numel()
        tensors = {"tokens": torch.cat(toks), "targets": torch.cat(tgts), "topk_ids": torch.cat(ids_l),
                   "topk_logprobs": torch.cat(lps_l), "tail": torch.cat(tails_l)}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"start": str(start), "count": str(count)})
        os.replace(tmp, path)
    bar.close()
    elapsed = time.perf_counter() - t0
    barrier()
    index = {
        "format": FORMAT, "version": VERSION, "top_k": top_k, "temperature": temperature, "seq_len": seq_len,
        "vocab_size": vocab, "ids_dtype": str(ids_dtype).replace("torch.", ""), "values_dtype": values_dtype,
        "bytes_per_token": bytes_per_token(top_k, vocab, values_dtype), "num_sequences": n,
        "num_tokens": n * seq_len, "shards": [{"file": f"shard-{i:05d}.safetensors", "start": s, "count": c} for i, s, c in shards],
        "teacher": teacher_name, "tokenizer": tokenizer_fingerprint(tokenizer), "data": stream.meta,
        "throughput_tokens_per_s": done_tokens * world_size / elapsed if done_tokens and elapsed > 0 else None,
    }
    if rank == 0:
        tokenizer.save_pretrained(out / "tokenizer")
        atomic_write_text(out / "index.json", json.dumps(index, indent=1) + "\n")
    barrier()
    return index


def _shard_count(path: Path) -> int:
    try:
        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {}).get("count", -1))
    except Exception:
        return -1


class TopKCache:
    """Reads a cache as a dataset: `get(window ids)` -> Batch with top-K extras."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index_file = self.path / "index.json"
        if not index_file.is_file():
            raise CacheError(f"{self.path} has no index.json; write the cache with `supernet cache-logits` "
                             "(an interrupted run resumes when started again)")
        self.index = json.loads(index_file.read_text())
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise CacheError(f"{self.path} is not a {FORMAT} v{VERSION} cache")
        self.seq_len = int(self.index["seq_len"])
        self.top_k = int(self.index["top_k"])
        self.temperature = float(self.index["temperature"])
        self.num_windows = int(self.index["num_sequences"])
        self._starts = np.array([s["start"] for s in self.index["shards"]])
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.num_windows

    def _shard(self, i: int) -> tuple[Any, int]:
        k = int(np.searchsorted(self._starts, i, side="right") - 1)
        if k not in self._handles:
            self._handles[k] = safe_open(str(self.path / self.index["shards"][k]["file"]), framework="pt")
        return self._handles[k], i - int(self._starts[k])

    def _read(self, i: int, name: str) -> torch.Tensor:
        f, j = self._shard(i)
        return f.get_slice(name)[j: j + 1]

    def check_compatible(self, seq_len: int | None, temperature: float, tokenizer: Any | None = None) -> None:
        if seq_len is not None and seq_len != self.seq_len:
            raise CacheError(f"cache {self.path} has seq_len {self.seq_len} but data.seq_len is {seq_len}; "
                             "make them equal or rewrite the cache")
        if abs(temperature - self.temperature) > 1e-9:
            raise CacheError(f"cache {self.path} holds log-probs at temperature {self.temperature} but "
                             f"loss.temperature is {temperature}; use the same value or rewrite the cache")
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != self.index.get("tokenizer"):
            raise CacheError(f"cache {self.path} was made with another tokenizer than the student's; to distil across "
                             f"vocabularies, transplant the student first (`supernet transplant-vocab STUDENT --tokenizer "
                             f"{self.path / 'tokenizer'} --out S2`, then student.path: S2); see training/README.md, "
                             "cross-vocabulary distillation")

    def target_counts(self, indices: Sequence[int]) -> int:
        return int(sum(int(self._read(int(i), "targets").sum()) for i in indices))

    def get(self, indices: Sequence[int]) -> Batch:
        idx = [int(i) for i in indices]
        toks = torch.cat([self._read(i, "tokens") for i in idx]).long()
        mask = torch.cat([self._read(i, "targets") for i in idx]).float()
        ids = torch.cat([self._read(i, "topk_ids") for i in idx])
        ids = ids.to(torch.int32).long() if ids.dtype == torch.uint16 else ids.long()
        lps = torch.cat([self._read(i, "topk_logprobs") for i in idx]).float()
        tail = torch.cat([self._read(i, "tail") for i in idx]).float()
        labels = toks[:, 1:].clone()
        labels[mask == 0] = -100
        return Batch(toks[:, :-1].contiguous(), labels, mask, torch.tensor(idx, dtype=torch.int64),
                     {"topk_ids": ids, "topk_logprobs": lps, "topk_tail": tail})
