"""Vocabulary transplant: give a model the embeddings and lm_head of another tokenizer.

Why: distillation compares the teacher's and the student's next-token distributions token by token,
so both must speak one vocabulary. A teacher from another family (or a supernet meant to serve with
another tokenizer) needs the student's vocabulary replaced first; this module does it without
training, from the old model's own embeddings (the idea of mergekit-tokensurgeon, implemented here
from its description):

1. Every token of both tokenizers gets a *key*: its bytes. Byte-level BPE tokens are mapped back
   through the GPT-2 byte alphabet (`Ġ` -> space), SentencePiece tokens turn `▁` into a space and
   `<0xNN>` into the byte; added tokens are their literal text; special tokens are keyed by their
   text in a namespace of their own, so `<|im_end|>` never matches the plain string "<|im_end|>".
2. A new token whose key an old token has is *shared*: its embedding row and lm_head row are copied.
   An unmatched special token with a role (bos, eos, pad, unk) takes the row of the old token with
   that role.
3. Every other new token is *approximated*: its bytes are split with the OLD tokenizer and the mean
   of the pieces' old embeddings is a first guess e0; orthogonal matching pursuit then writes e0 as
   a combination of at most k shared tokens (greedy: the shared token most correlated with the
   residual, then a least-squares refit, k times; the first pick is the nearest shared token by
   cosine). The same coefficients applied to those tokens' lm_head rows give the new lm_head row,
   so an untied head stays consistent with its embedding, and every new row is built only from rows
   that the new model keeps. Tokens with no pieces at all get the mean row (a neutral start).

Transplanting to the same tokenizer therefore copies every row: the identity, exactly.
Works for supernet checkpoints and plain HF decoder folders; the output is a folder of the same kind
with the new tokenizer in it and `vocab_size` / bos / eos / pad ids updated.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

SPECIAL = b"\x00special:"  # key prefix of special tokens: no real token's bytes start like this
ROLES = ("bos", "eos", "pad", "unk")


class TransplantError(ValueError):
    """A transplant that cannot be done as asked; one line naming the problem and the fix."""


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte."""
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # the alphabet is the 256 characters; rebuild GPT-2's order (printable bytes map to themselves)
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    assert set(chars) == set(alphabet), "GPT-2 byte alphabet mismatch"
    return chars


def _scheme(tokenizer: Any) -> str:
    """How vocabulary strings spell bytes: byte_level | metaspace | plain."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "plain"
    spec = backend.to_str()
    if '"ByteLevel"' in spec:
        return "byte_level"
    if '"Metaspace"' in spec or "\u2581" in spec or '"ByteFallback"' in spec:
        return "metaspace"
    return "plain"


def _piece_bytes(piece: str, scheme: str) -> bytes | None:
    """The bytes a (non-added) vocabulary string stands for; None where it cannot be read."""
    if scheme == "byte_level":
        table = _byte_decoder()
        try:
            return bytes(table[c] for c in piece)
        except KeyError:
            return piece.encode("utf-8", "surrogatepass")
    if scheme == "metaspace":
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace("\u2581", " ").encode("utf-8", "surrogatepass")
    return piece.encode("utf-8", "surrogatepass")


@dataclass
class Vocabulary:
    """One tokenizer's tokens as byte keys, with its special tokens' roles."""

    keys: list[bytes | None]  # by id; None for ids without a token (padding rows)
    roles: dict[str, int]  # bos/eos/pad/unk -> id
    scheme: str


def vocabulary(tokenizer: Any, size: int | None = None) -> Vocabulary:
    size = size if size is not None else len(tokenizer)
    scheme = _scheme(tokenizer)
    keys: list[bytes | None] = [None] * size
    added = {int(i): t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for piece, idx in tokenizer.get_vocab().items():
        if not 0 <= idx < size:
            continue
        tok = added.get(idx)
        if tok is not None and (getattr(tok, "special", False) or str(tok) in specials):
            keys[idx] = SPECIAL + str(tok).encode("utf-8", "surrogatepass")
        elif tok is not None:
            keys[idx] = str(tok).encode("utf-8", "surrogatepass")
        elif piece in specials:
            keys[idx] = SPECIAL + piece.encode("utf-8", "surrogatepass")
        else:
            keys[idx] = _piece_bytes(piece, scheme)
    roles = {}
    for role in ROLES:
        idx = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(idx, int) and 0 <= idx < size:
            roles[role] = idx
    return Vocabulary(keys, roles, scheme)


def _old_pieces(old_tokenizer: Any, old: Vocabulary, data: bytes) -> list[int]:
    """Split `data` into old token ids (the old tokenizer's own segmentation of those bytes)."""
    if not data:
        return []
    if old.scheme == "byte_level":  # exact for any bytes, including partial UTF-8 sequences
        inverse = {b: c for c, b in _byte_decoder().items()}
        text = "".join(inverse[b] for b in data)
        ids = [t.id for t in old_tokenizer.backend_tokenizer.model.tokenize(text)]
    else:
        ids = old_tokenizer.encode(data.decode("utf-8", "replace"), add_special_tokens=False)
    unk = old.roles.get("unk")
    return [i for i in ids if i != unk and i < len(old.keys)]


def omp(targets: torch.Tensor, atoms: torch.Tensor, k: int, chunk: int = 512,
        progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal matching pursuit: for every row of `targets` [N, D], up to k rows of `atoms`
    [M, D] and coefficients whose combination is the least-squares fit of that row.

    Each pick is the atom most correlated with the residual (the first: the nearest atom by
    cosine), then all picked coefficients are refitted by least squares. The correlations are one
    float32 matmul per pick (N x M x D, a few minutes for 10^5 x 5 10^4 tokens on a CPU); the
    refits run in float64, so their small systems are well conditioned. Returns (indices [N, k]
    into atoms, coefficients [N, k])."""
    from tqdm.auto import tqdm

    k = min(k, atoms.shape[0])
    n = targets.shape[0]
    idx_out = torch.zeros(n, k, dtype=torch.long)
    coef_out = torch.zeros(n, k, dtype=torch.float64)
    a = atoms.double()
    a_unit = (a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)).float()
    for s in tqdm(range(0, n, chunk), desc="matching pursuit", unit="chunk", disable=not progress):
        t = targets[s: s + chunk].double()
        resid = t.clone()
        chosen = torch.zeros(t.shape[0], 0, dtype=torch.long)
        coef = torch.zeros(t.shape[0], 0, dtype=torch.float64)
        for _ in range(k):
            corr = (resid.float() @ a_unit.T).abs()
            if chosen.shape[1]:
                corr.scatter_(1, chosen, -1.0)
            chosen = torch.cat([chosen, corr.argmax(1, keepdim=True)], 1)
            basis = a[chosen]  # [n, j, D]
            coef = torch.linalg.lstsq(basis.transpose(1, 2), t.unsqueeze(-1)).solution.squeeze(-1)
            resid = t - torch.einsum("nj,njd->nd", coef, basis)
        idx_out[s: s + chunk] = chosen
        coef_out[s: s + chunk] = coef
    return idx_out, coef_out


@dataclass
class TransplantReport:
    old_vocab: int
    new_vocab: int
    copied: int  # shared tokens (rows copied)
    by_role: int  # unmatched specials given the old row of their role
    approximated: int  # built from old pieces through OMP over shared tokens
    mean_init: int  # no pieces: the mean row
    k: int
    tied: bool
    examples: dict[str, list[str]] = field(default_factory=dict)  # a few approximated tokens -> their pieces


def transplant_matrices(embed: torch.Tensor, head: torch.Tensor | None, old_tokenizer: Any, new_tokenizer: Any,
                        k: int = 8, new_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None, TransplantReport]:
    """New (embedding, lm_head) rows for `new_tokenizer` from the old ones ([V_old, D] each; head None
    when tied). Rows the old model has beyond its tokenizer (padding) are never used as sources."""
    old = vocabulary(old_tokenizer, min(len(old_tokenizer), embed.shape[0]))
    new_size = new_size or len(new_tokenizer)
    if new_size < len(new_tokenizer):
        raise TransplantError(f"the new vocabulary size {new_size} is below the tokenizer's {len(new_tokenizer)} tokens")
    new = vocabulary(new_tokenizer, new_size)
    first: dict[bytes, int] = {}
    for i, key in enumerate(old.keys):
        if key is not None and key not in first:
            first[key] = i
    source = [first.get(key) if key is not None else None for key in new.keys]  # new id -> old id
    by_role = 0
    for role, j in new.roles.items():
        if source[j] is None and role in old.roles:
            source[j] = old.roles[role]
            by_role += 1
    shared_new = [j for j, s in enumerate(source) if s is not None]
    if not shared_new:
        raise TransplantError("the two tokenizers share no token, so no row can be copied or approximated; "
                              "check that --tokenizer is a text tokenizer of the same kind of data")
    d = embed.shape[1]
    mats = [embed] + ([head] if head is not None else [])
    out = [torch.empty(new_size, d, dtype=torch.float32) for _ in mats]
    src_ids = torch.tensor([source[j] for j in shared_new])
    for o, m in zip(out, mats):
        o[shared_new] = m[src_ids].float()
        o[[j for j, s in enumerate(source) if s is None]] = m[: len(old.keys)].float().mean(0)
    shared_old = sorted(set(src_ids.tolist()))
    todo, guesses, examples = [], [], {}
    for j, s in enumerate(source):
        if s is not None or new.keys[j] is None or new.keys[j].startswith(SPECIAL):
            continue
        pieces = _old_pieces(old_tokenizer, old, new.keys[j])
        if not pieces:
            continue
        todo.append(j)
        guesses.append(embed[pieces].float().mean(0))
        if len(examples) < 5:
            examples[new.keys[j].decode("utf-8", "replace")] = [old.keys[p].decode("utf-8", "replace") for p in pieces]
    if todo and k > 0:
        atoms = torch.tensor(shared_old)
        idx, coef = omp(torch.stack(guesses), embed[atoms].float(), k, progress=len(todo) > 20000)
        for o, m in zip(out, mats):
            basis = m[atoms].double()[idx]  # [N, k, D]
            o[todo] = torch.einsum("nk,nkd->nd", coef, basis).float()
    elif todo:  # k = 0: the mean of the pieces itself, for both matrices
        out[0][todo] = torch.stack(guesses)
        if head is not None:
            out[1][todo] = torch.stack([head[_old_pieces(old_tokenizer, old, new.keys[j])].float().mean(0) for j in todo])
    mean_init = new_size - len(shared_new) - len(todo)
    report = TransplantReport(len(old.keys), new_size, len(shared_new) - by_role, by_role, len(todo), mean_init, k,
                              head is None, examples)
    return out[0], (out[1] if head is not None else None), report


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def load_new_tokenizer(path: str | Path) -> Any:
    """A tokenizer folder (or a model folder with tokenizer files), a tokenizer.json file, a .gguf
    file, or a teacher name the training configs know (`smollm2`, `builtin:tiny-llama`)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from supernet.training.models import teacher_location

    name, _ = teacher_location(str(path), None)
    if name == "smollm2":
        from supernet.teacher import smollm2_hf_dir

        name = str(smollm2_hf_dir())
    p = Path(name)
    if p.is_file() and p.suffix == ".json":
        return PreTrainedTokenizerFast(tokenizer_file=str(p))
    if p.is_file() and p.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    if not p.is_dir():
        raise TransplantError(f"--tokenizer {p} is neither a tokenizer folder, a tokenizer.json nor a .gguf file")
    try:
        return AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError) as exc:
        raise TransplantError(f"--tokenizer {p} holds no loadable tokenizer ({str(exc).splitlines()[0]})") from None


def _load_model(ckpt: str | Path) -> tuple[Any, Any, str]:
    """(model in float32, its tokenizer, 'supernet' | 'hf'); HF folders, GGUF files and `smollm2`
    load as teachers do (supernet/teacher.py)."""
    from transformers import AutoTokenizer

    config_file = Path(ckpt) / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == "supernet":
        import supernet.model  # noqa: F401  (registers the Auto classes)
        from supernet.model import SupernetForCausalLM

        model = SupernetForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
        except (OSError, ValueError):
            raise TransplantError(f"{ckpt} has no tokenizer; the old tokenizer is needed to match and split tokens "
                                  "(save it into the checkpoint folder)") from None
        return model.eval(), tokenizer, "supernet"
    from supernet.teacher import load_teacher

    model, tokenizer = load_teacher(ckpt)
    return model.eval(), tokenizer, "hf"


def transplant_model(model: Any, old_tokenizer: Any, new_tokenizer: Any, k: int = 8,
                     pad_to_multiple_of: int = 1) -> TransplantReport:
    """Give `model` (an HF causal LM or a supernet, in memory) the embeddings and lm_head of
    `new_tokenizer`, tied or untied as it has them, and update its config's vocabulary ids."""
    emb = model.get_input_embeddings()
    head_mod = model.get_output_embeddings()
    if getattr(head_mod, "bias", None) is not None:
        raise TransplantError("the model's lm_head has a bias; transplanting such heads is not supported")
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and head_mod.weight is emb.weight
    size = -(-len(new_tokenizer) // pad_to_multiple_of) * pad_to_multiple_of
    with torch.no_grad():
        new_e, new_h, report = transplant_matrices(emb.weight.detach(), None if tied else head_mod.weight.detach(),
                                                   old_tokenizer, new_tokenizer, k, size)
    dtype = emb.weight.dtype
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(new_e.to(dtype))
        if not tied:
            model.get_output_embeddings().weight.copy_(new_h.to(dtype))
    config = model.config
    config.vocab_size = size
    for role in ("bos", "eos", "pad"):
        idx = getattr(new_tokenizer, f"{role}_token_id", None)
        setattr(config, f"{role}_token_id", idx)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, f"{role}_token_id", idx)
    if getattr(config, "model_type", None) == "supernet":
        model.model.embed_tokens.padding_idx = config.pad_token_id
    return report


def transplant_vocab(ckpt: str | Path, tokenizer: str | Path | Any, out: str | Path, k: int = 8,
                     pad_to_multiple_of: int = 1) -> TransplantReport:
    """`supernet transplant-vocab`: write `out`, a copy of `ckpt` that speaks `tokenizer`."""
    from supernet.convert import save_checkpoint
    from supernet.io_utils import atomic_write_text

    if k < 0:
        raise TransplantError(f"--k must be >= 0 (0: the mean of the old pieces, no matching pursuit), got {k}")
    if pad_to_multiple_of < 1:
        raise TransplantError(f"--pad-to must be >= 1, got {pad_to_multiple_of}")
    new_tok = load_new_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    model, old_tok, kind = _load_model(ckpt)
    report = transplant_model(model, old_tok, new_tok, k, pad_to_multiple_of)
    saved = save_checkpoint(model, out, new_tok)
    atomic_write_text(saved / "transplant.json", json.dumps({"source": str(ckpt), "kind": kind, **asdict(report)},
                                                            indent=1, ensure_ascii=False) + "\n")
    return report
