"""Corpora -> fixed-length training sequences, deterministic and resumable, sharded across ranks.

Pipeline: jsonl/txt files -> documents (`{"text": ...}` or chat `{"messages": [...]}`) -> one token
stream with a per-token *target mask* -> non-overlapping windows of `seq_len` inputs (+1 target).

How document boundaries are respected. The model runs plain causal sequences (no intra-sequence
document masking), so documents are packed back to back and boundaries are handled in the loss:

* text: each document is followed by a separator token (EOS by default); the model is trained to
  predict that separator (it learns where documents end), but the position whose target is the
  *first token of the next document* is masked out — nothing is ever predicted across a boundary.
* chat: each conversation is rendered with the tokenizer's chat template; only assistant tokens
  (the reply and its end-of-turn marker) are targets, so conversation starts are never targets.
* A document longer than a window continues in the next window (windows are consecutive slices of
  the stream), so long documents are split and short ones are packed; no tokens are padded away.

Attention still sees the previous document inside a window; teacher and student see the same
context, so distillation targets stay consistent. Positions run 0..seq_len-1 in every window.

Determinism and resume: sample `g` of the run (counting over all steps, micro-batches and ranks) is
window `perm_e[g mod W]` of epoch `e = g // W`, where `perm_e` is a permutation seeded by
(seed, e). The data position is therefore a pure function of the optimizer step: resuming at step
`s` needs no iterator state, and any split of a global batch over ranks / micro-batches reads the
same windows.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from supernet.io_utils import atomic_write_text


class DataError(ValueError):
    """A corpus that cannot be used; the message names the file and the fix."""


# ---------------------------------------------------------------------------------------------
# reading documents
# ---------------------------------------------------------------------------------------------
def expand_paths(patterns: Sequence[str]) -> list[Path]:
    """Files named by paths or globs, in a stable order; missing ones are an error."""
    out: list[Path] = []
    for pat in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pat)))
        if not matches:
            raise DataError(f"data file {pat} does not exist; fix data.train / data.eval in the config")
        out.extend(Path(m) for m in matches)
    return out


def read_documents(paths: Sequence[Path], max_documents: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield records: jsonl lines as dicts; a .txt file as one `{"text": ...}` document."""
    count = 0
    for path in paths:
        if path.suffix in (".jsonl", ".json"):
            with path.open("r", encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{lineno} is not valid JSON ({exc.msg}); one object per line") from None
                    if not isinstance(rec, dict) or not ("text" in rec or "messages" in rec):
                        raise DataError(f"{path}:{lineno} needs a 'text' or a 'messages' field")
                    yield rec
                    count += 1
                    if max_documents is not None and count >= max_documents:
                        return
        else:
            yield {"text": path.read_text(encoding="utf-8")}
            count += 1
            if max_documents is not None and count >= max_documents:
                return


def detect_format(paths: Sequence[Path]) -> str:
    """'chat' if the first record has `messages`, else 'text'."""
    for rec in read_documents(paths, max_documents=1):
        return "chat" if "messages" in rec else "text"
    raise DataError(f"no documents in {', '.join(map(str, paths))}")


# ---------------------------------------------------------------------------------------------
# tokenisation
# ---------------------------------------------------------------------------------------------
def separator_id(tokenizer: Any, separator: str) -> int:
    """The token appended after each text document."""
    if separator in ("eos", "bos"):
        tid = tokenizer.eos_token_id if separator == "eos" else tokenizer.bos_token_id
        if tid is None:
            raise DataError(f"the tokenizer has no {separator} token; set data.separator to a token string")
        return int(tid)
    tid = tokenizer.convert_tokens_to_ids(separator)
    if tid is None or tid == tokenizer.unk_token_id:
        raise DataError(f"data.separator {separator!r} is not a token of this tokenizer")
    return int(tid)


def tokenize_text(tokenizer: Any, texts: list[str], sep: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each document -> (ids + [sep], target mask); the first token is not a target (boundary)."""
    enc = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]  # long documents are fine
    out = []
    for ids in enc:
        ids = np.asarray(list(ids) + [sep], dtype=np.int64)
        mask = np.ones(len(ids), dtype=np.uint8)
        mask[0] = 0
        out.append((ids, mask))
    return out


def tokenize_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """A conversation -> (ids, mask) with mask 1 exactly on assistant tokens.

    The assistant spans are found on the rendered text: message i's span is what
    `render(messages[:i+1])` adds to `render(messages[:i], add_generation_prompt=True)`; tokens
    whose characters fall inside a span are targets. This works for any template that renders
    prefixes consistently (ChatML and most others); a template that does not is refused.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; chat data needs one (or use text data)")
    render = lambda msgs, gen=False: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    full = render(messages)
    spans: list[tuple[int, int]] = []
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        before = render(messages[:i], True)
        upto = render(messages[: i + 1])
        if not upto.startswith(before) or not full.startswith(upto):
            raise DataError("the chat template does not render conversations prefix-consistently; "
                            "cannot locate assistant tokens")
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=np.uint8)
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(s <= a and b <= e for s, e in spans):
            mask[t] = 1
    return ids, mask


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Stable hash of what decides token ids (vocab, specials, chat template)."""
    h = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}:{tok}\n".encode("utf-8", "surrogatepass"))
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(f"{tokenizer.eos_token_id},{tokenizer.bos_token_id}".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# the token stream (cached on disk, memory-mapped)
# ---------------------------------------------------------------------------------------------
@dataclass
class TokenStream:
    """All documents of a split, back to back: token ids and the per-token target mask."""

    tokens: np.ndarray  # [N] uint16/uint32
    targets: np.ndarray  # [N] uint8: 1 = this token is a valid prediction target
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.tokens)


def _stream_key(paths: Sequence[Path], fmt: str, tokenizer: Any, separator: str, max_docs: int | None) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    h.update(f"{fmt}|{separator}|{max_docs}|{tokenizer_fingerprint(tokenizer)}".encode())
    return h.hexdigest()[:20]


def build_token_stream(
    patterns: Sequence[str],
    tokenizer: Any,
    cache_dir: str | Path,
    fmt: str = "auto",
    separator: str = "eos",
    max_documents: int | None = None,
    is_main: bool = True,
    barrier: Callable[[], None] | None = None,
    progress: bool = True,
) -> TokenStream:
    """Tokenise the files once (rank 0), cache them as raw arrays, and memory-map them everywhere."""
    paths = expand_paths(patterns)
    if fmt == "auto":
        fmt = detect_format(paths)
    key = _stream_key(paths, fmt, tokenizer, separator, max_documents)
    cache_dir = Path(cache_dir)
    meta_path = cache_dir / f"{key}.json"
    if is_main and not meta_path.exists():
        _write_stream(paths, fmt, tokenizer, separator, max_documents, cache_dir, key, progress)
    if barrier is not None:
        barrier()
    meta = json.loads(meta_path.read_text())
    tokens = np.memmap(cache_dir / meta["tokens_file"], dtype=meta["token_dtype"], mode="r")
    targets = np.memmap(cache_dir / meta["targets_file"], dtype=np.uint8, mode="r")
    return TokenStream(tokens, targets, meta)


def _write_stream(paths, fmt, tokenizer, separator, max_docs, cache_dir: Path, key: str, progress: bool) -> None:
    from tqdm.auto import tqdm

    cache_dir.mkdir(parents=True, exist_ok=True)
    vocab = len(tokenizer)
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    tok_path, tgt_path = cache_dir / f"{key}.tokens.bin", cache_dir / f"{key}.targets.bin"
    tmp_tok, tmp_tgt = tok_path.with_suffix(".tmp"), tgt_path.with_suffix(".tmp")
    sep = separator_id(tokenizer, separator) if fmt == "text" else None
    n_docs = n_tok = n_tgt = 0
    bar = tqdm(desc=f"tokenising {paths[0].name}" + (" ..." if len(paths) > 1 else ""), unit="doc",
               disable=not progress)
    with tmp_tok.open("wb") as ft, tmp_tgt.open("wb") as fm:
        def emit(ids: np.ndarray, mask: np.ndarray) -> None:
            nonlocal n_tok, n_tgt, n_docs
            ft.write(ids.astype(dtype).tobytes())
            fm.write(mask.astype(np.uint8).tobytes())
            n_tok += len(ids)
            n_tgt += int(mask.sum())
            n_docs += 1
            bar.update(1)

        batch: list[str] = []
        for rec in read_documents(paths, max_docs):
            if fmt == "chat":
                if "messages" not in rec:
                    raise DataError("chat data needs a 'messages' list in every record")
                emit(*tokenize_chat(tokenizer, rec["messages"]))
            else:
                if "text" not in rec:
                    raise DataError("text data needs a 'text' field in every record")
                batch.append(str(rec["text"]))
                if len(batch) >= 256:
                    for ids, mask in tokenize_text(tokenizer, batch, sep):
                        emit(ids, mask)
                    batch = []
        if batch:
            for ids, mask in tokenize_text(tokenizer, batch, sep):
                emit(ids, mask)
    bar.close()
    if n_tok == 0:
        raise DataError(f"no tokens in {', '.join(map(str, paths))}")
    os.replace(tmp_tok, tok_path)
    os.replace(tmp_tgt, tgt_path)
    meta = {
        "files": [str(p) for p in paths], "format": fmt, "separator": separator,
        "num_documents": n_docs, "num_tokens": n_tok, "num_targets": n_tgt,
        "token_dtype": np.dtype(dtype).name, "tokens_file": tok_path.name, "targets_file": tgt_path.name,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    atomic_write_text(cache_dir / f"{key}.json", json.dumps(meta, indent=1))


# ---------------------------------------------------------------------------------------------
# windows, batches and the global order
# ---------------------------------------------------------------------------------------------
@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64: next token, -100 where not a target
    mask: torch.Tensor  # [B, T] float32: 1 where position t's prediction counts
    index: torch.Tensor  # [B] int64: window ids (for offline teacher lookups / debugging)
    extras: dict[str, torch.Tensor] | None = None  # e.g. top-K teacher signals

    def to(self, device: torch.device | str) -> "Batch":
        ex = {k: v.to(device, non_blocking=True) for k, v in (self.extras or {}).items()}
        return Batch(self.input_ids.to(device, non_blocking=True), self.labels.to(device, non_blocking=True),
                     self.mask.to(device, non_blocking=True), self.index, ex or None)

    @property
    def num_targets(self) -> int:
        return int(self.mask.sum().item())


class PackedDataset:
    """Window i = stream[i*T : i*T + T] as inputs, stream[i*T+1 : i*T+T+1] as targets."""

    def __init__(self, stream: TokenStream, seq_len: int) -> None:
        self.stream = stream
        self.seq_len = seq_len
        self.num_windows = (len(stream) - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(f"the corpus has {len(stream)} tokens, fewer than seq_len+1 = {seq_len + 1}; "
                            "use a shorter data.seq_len or more data")

    def __len__(self) -> int:
        return self.num_windows

    def window(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        T = self.seq_len
        toks = np.asarray(self.stream.tokens[i * T: i * T + T + 1], dtype=np.int64)
        tgts = np.asarray(self.stream.targets[i * T + 1: i * T + T + 1], dtype=np.float32)
        return toks, tgts

    def target_counts(self, indices: Sequence[int]) -> int:
        T = self.seq_len
        return int(sum(int(self.stream.targets[int(i) * T + 1: int(i) * T + T + 1].sum()) for i in indices))

    def get(self, indices: Sequence[int]) -> Batch:
        toks, tgts = zip(*(self.window(int(i)) for i in indices))
        toks_t = torch.from_numpy(np.stack(toks))
        mask = torch.from_numpy(np.stack(tgts))
        labels = toks_t[:, 1:].clone()
        labels[mask == 0] = -100
        return Batch(toks_t[:, :-1].contiguous(), labels, mask, torch.as_tensor(list(indices), dtype=torch.int64))


class GlobalOrder:
    """Maps (step, micro-batch, rank) to window ids; a pure function of the step (exact resume).

    Within a step the global batch is `grad_accum * world_size * micro_batch_size` consecutive
    samples; micro-batch m of rank r takes rows `[(m * world + r) * B, ... + B)`. A run with one
    process and `grad_accum * world` micro-batches therefore reads the same global batch.
    """

    def __init__(self, num_windows: int, micro_batch_size: int, grad_accum: int, world_size: int = 1,
                 rank: int = 0, seed: int = 0, shuffle: bool = True) -> None:
        self.num_windows = num_windows
        self.micro = micro_batch_size
        self.accum = grad_accum
        self.world = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            else:
                self._perm = np.arange(self.num_windows)
            self._perm_epoch = epoch
        return self._perm  # type: ignore[return-value]

    def sample(self, g: int) -> int:
        return int(self._permutation(g // self.num_windows)[g % self.num_windows])

    def micro_indices(self, step: int, micro: int, rank: int | None = None) -> list[int]:
        r = self.rank if rank is None else rank
        start = step * self.global_batch + (micro * self.world + r) * self.micro
        return [self.sample(g) for g in range(start, start + self.micro)]

    def step_indices(self, step: int) -> list[int]:
        """Every window of the global batch of `step` (all ranks, all micro-batches)."""
        start = step * self.global_batch
        return [self.sample(g) for g in range(start, start + self.global_batch)]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.num_windows


def eval_indices(num_windows: int, n: int) -> list[int]:
    """The first n windows of the held-out split (fixed, so evaluations compare across steps)."""
    return list(range(min(n, num_windows)))


def iter_chunks(seq: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for i in range(0, len(seq), size):
        yield seq[i: i + size]
