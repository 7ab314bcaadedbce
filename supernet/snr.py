"""Spectrum's signal-to-noise ratio of weight matrices, and the parameter selection built on it.

Why: Spectrum (Hartford, Atkins, Fernandes Neto, Golchinfar 2024, "Spectrum: Targeted Training on
Signal to Noise Ratio", arXiv:2406.06623) trains only the modules whose weight matrices carry the
most signal above a random-matrix noise floor, freezing the rest, and matches full fine-tuning with
less memory. The definition, as the paper and its authors' reference implementation
(cognitivecomputations/spectrum) compute it, for one weight matrix W of shape m x n:

- s_1 >= s_2 >= ... >= s_k, k = min(m, n): the singular values of W;
- sigma = IQR(s) / 1.349: the noise scale, estimated robustly from the interquartile range of the
  singular values (1.349 is the IQR of a unit Gaussian);
- beta = min(m, n) / max(m, n), and the Marchenko-Pastur bound tau = sigma * (1 + sqrt(beta)): the
  upper edge of the MP bulk, in singular-value units, for noise of scale sigma; singular values above
  tau count as signal, the others as noise;
- SNR = (sum of s_i > tau) / (sum of s_i <= tau), and the score Spectrum ranks by is SNR / s_1
  (normalised by the largest singular value). A matrix without noise singular values scores +inf.

Modules are ranked per module type (q_proj, k_proj, ... of each mixer kind fa/swa/gdn/kda, the MLP's
gate/up/down, the embeddings): the top P percent of each type (ceil(P/100 * count), so every type
keeps at least one module when P > 0) are unfrozen; a selected module's bias is unfrozen with its
weight. Everything is computed in float64 from the checkpoint's stored tensors (safetensors), in name
order with a fixed thread count, so two scans of the same checkpoint give identical numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from supernet.io_utils import read_yaml
from supernet.threads import torch_threads
from supernet.layout import MIXERS as MIXER_KINDS

IQR_OF_UNIT_GAUSSIAN = 1.349


class SNRError(ValueError):
    """Bad input to `supernet snr`; the message is one line naming the problem and the fix."""


@dataclass(frozen=True)
class MatrixSNR:
    """Spectrum's numbers for one weight matrix (see the module docstring)."""

    name: str  # the parameter's checkpoint name, e.g. model.layers.3.mixers.gdn.q_proj.weight
    module_type: str  # what it is ranked against, e.g. gdn.q_proj
    shape: tuple[int, int]
    sigma: float  # IQR(s) / 1.349
    threshold: float  # sigma * (1 + sqrt(beta))
    signal_count: int  # singular values above the threshold
    snr: float  # signal sum / noise sum
    score: float  # snr / s_1 (Spectrum's ranking score)


def mp_threshold(sigma: float, rows: int, cols: int) -> float:
    """Upper edge of the Marchenko-Pastur bulk of singular values for noise scale `sigma`."""
    beta = min(rows, cols) / max(rows, cols)
    return sigma * (1.0 + math.sqrt(beta))


def spectrum_snr(singular_values: torch.Tensor, rows: int, cols: int) -> tuple[float, float, int, float, float]:
    """(sigma, threshold, signal count, SNR, score) from one matrix's singular values (float64)."""
    s = singular_values.to(torch.float64)
    q25, q75 = torch.quantile(s, torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
    sigma = (q75 - q25) / IQR_OF_UNIT_GAUSSIAN
    tau = mp_threshold(sigma, rows, cols)
    signal_mask = s > tau
    signal = float(s[signal_mask].sum())
    noise = float(s[~signal_mask].sum())
    snr = signal / noise if noise > 0 else math.inf
    top = float(s.max())
    score = snr / top if top > 0 else 0.0
    return sigma, tau, int(signal_mask.sum()), snr, score


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """Singular values of a float64 matrix, from the eigenvalues of its smaller Gram matrix.

    Why not an SVD: LAPACK's float64 SVD of SmolLM2's ~600 matrices took minutes on 2 cores; the
    Gram product is one GEMM and the symmetric eigenproblem is k x k (k = min(m, n)). The price is
    absolute accuracy: eigenvalues carry an error of about k * eps * s_1^2, so s_i is off by about
    k * eps * s_1^2 / (2 s_i): below 1e-10 * s_1 for every s_i >= 1e-4 * s_1 at k = 576 in float64,
    which leaves the sums and quartiles Spectrum uses unchanged to ~10 digits.
    """
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    eig = torch.linalg.eigvalsh(gram)
    return eig.clamp_min(0.0).sqrt().flip(0)


def matrix_snr(name: str, weight: torch.Tensor) -> MatrixSNR:
    """Spectrum's SNR of one 2-D weight, computed in float64."""
    w = weight.detach().to(torch.float64)
    if w.ndim != 2:
        raise SNRError(f"{name} has shape {tuple(w.shape)}; SNR is defined for 2-D weight matrices")
    s = singular_values(w)
    sigma, tau, count, snr, score = spectrum_snr(s, *w.shape)
    return MatrixSNR(name, module_type(name), tuple(w.shape), sigma, tau, count, snr, score)


def module_type(name: str) -> str:
    """The type a parameter is ranked within: the name after the layer index, without `mixers.` and
    `.weight` (model.layers.3.mixers.gdn.q_proj.weight -> gdn.q_proj; model.layers.0.self_attn.q_proj
    .weight -> self_attn.q_proj in an HF teacher; model.embed_tokens.weight -> embed_tokens)."""
    parts = name.split(".")
    if parts[-1] == "weight":
        parts = parts[:-1]
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    rest = parts[digits[0] + 1:] if digits else parts
    if rest and rest[0] == "mixers":
        rest = rest[1:]
    if not digits and rest and rest[0] == "model":
        rest = rest[1:]
    return ".".join(rest) or name


def type_selected(mtype: str, only: list[str] | None) -> bool:
    """Whether `--only` keeps a module type: a listed type or a prefix group (`gdn`, `mlp`, `self_attn`);
    `mixers` stands for fa/swa/gdn/kda and `shared` for every other type."""
    if not only:
        return True
    head = mtype.split(".")[0]
    for item in only:
        if mtype == item or mtype.startswith(item + "."):
            return True
        if item == "mixers" and head in MIXER_KINDS:
            return True
        if item == "shared" and head not in MIXER_KINDS:
            return True
    return False


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF / supernet folder (one file or shards), with one-line errors."""
    folder = Path(folder)
    if folder.is_file() and folder.suffix == ".gguf":
        raise SNRError(f"{folder} is a GGUF file; convert it first (`supernet convert {folder} OUT`) and scan OUT")
    if not folder.is_dir():
        raise SNRError(f"{folder} is not a folder; give a supernet checkpoint or an HF model folder")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SNRError(f"{folder} holds no .safetensors weights; give a supernet checkpoint or an HF model folder")
    return files


def scan(folder: Path, only: list[str] | None = None, progress: bool = True,
         threads: int = 1) -> tuple[list[MatrixSNR], set[str]]:
    """Spectrum's SNR of every weight matrix of the checkpoint whose type `--only` keeps (in sorted
    name order); also every tensor name (to pair a selected weight with its bias)."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    handles = [safe_open(str(f), framework="pt") for f in checkpoint_files(folder)]
    where = {k: h for h in handles for k in h.keys()}
    names = []
    for k in sorted(where):
        shape = where[k].get_slice(k).get_shape()
        if len(shape) == 2 and min(shape) > 1 and type_selected(module_type(k), only):
            names.append(k)
    if not names:
        raise SNRError(f"no weight matrix of {folder} matches --only {','.join(only or [])}; "
                       "use module types such as gdn, fa.q_proj, mlp, mixers or shared")
    results: list[MatrixSNR] = []
    with torch_threads(threads):
        for name in tqdm(names, unit="matrix", desc="snr", disable=not progress):
            tensor = where[name].get_tensor(name)
            if tensor.is_floating_point():
                results.append(matrix_snr(name, tensor))
    return results, set(where)


def select_top(results: Iterable[MatrixSNR], top_percent: float) -> dict[str, list[MatrixSNR]]:
    """Per module type, the results sorted by score (highest first, ties in layer order); the first
    `selected_count` of each are selected."""
    check_percent(top_percent)
    by_type: dict[str, list[MatrixSNR]] = {}
    for r in results:
        by_type.setdefault(r.module_type, []).append(r)
    for rows in by_type.values():
        rows.sort(key=lambda r: (-r.score, natural_key(r.name)))
    return dict(sorted(by_type.items()))


def natural_key(name: str) -> tuple:
    """Layer indices compare as numbers (layers.2 before layers.10)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def tied_cuts(document: dict) -> list[str]:
    """Module types whose top-P cut falls inside a run of equal scores (e.g. +inf: every singular value
    above the MP bound, which small matrices such as GDN's a_proj with 9 rows always are): the
    selection among the tied modules is by layer order, not by signal."""
    out = []
    for mtype, rows in document["scores"].items():
        keep = sum(r["selected"] for r in rows)
        if 0 < keep < len(rows) and rows[keep - 1]["score"] == rows[keep]["score"]:
            out.append(mtype)
    return out


def selected_count(count: int, top_percent: float) -> int:
    # the epsilon keeps e.g. 10% of 30 at 3 when 0.1 * 30 rounds to 3.0000000000000004
    return min(count, math.ceil(count * top_percent / 100.0 - 1e-9))


def check_percent(top_percent: float) -> None:
    if not (isinstance(top_percent, (int, float)) and math.isfinite(top_percent) and 0 < top_percent <= 100):
        raise SNRError(f"--top-percent must be in (0, 100], got {top_percent}; e.g. --top-percent 25")


def selection_document(source: Path, results: list[MatrixSNR], all_names: set[str], top_percent: float,
                       only: list[str] | None) -> dict:
    """The YAML document: `trainable` (what `train.trainable: FILE` unfreezes) and per-type `scores`."""
    ranked = select_top(results, top_percent)
    trainable: list[str] = []
    scores: dict[str, list[dict]] = {}
    for mtype, rows in ranked.items():
        keep = selected_count(len(rows), top_percent)
        scores[mtype] = []
        for rank, r in enumerate(rows):
            chosen = rank < keep
            if chosen:
                trainable.append(r.name)
                bias = r.name[: -len("weight")] + "bias" if r.name.endswith(".weight") else None
                if bias in all_names:
                    trainable.append(bias)
            scores[mtype].append({"name": r.name, "score": r.score, "snr": r.snr, "sigma": r.sigma,
                                  "threshold": r.threshold, "signal_singular_values": r.signal_count,
                                  "shape": list(r.shape), "selected": chosen})
    return {
        "source": str(Path(source).resolve()),
        "method": "spectrum-snr: score = (sum s > tau / sum s <= tau) / s_1, tau = IQR(s)/1.349 * (1 + sqrt(beta))",
        "top_percent": top_percent,
        "only": list(only) if only else None,
        "trainable": sorted(trainable, key=natural_key),
        "scores": scores,
    }


def write_selection(path: Path, document: dict) -> None:
    import yaml

    from supernet.io_utils import atomic_write_text

    header = ("# Spectrum selection written by `supernet snr`: `train.trainable: <this file>` trains exactly\n"
              "# the parameters under `trainable` and freezes every other one; `scores` is for inspection.\n")
    atomic_write_text(Path(path), header + yaml.safe_dump(document, sort_keys=False, width=120))


def read_selection(path: Path) -> list[str]:
    """The parameter names a selection file lists under `trainable`, with one-line errors."""
    path = Path(path)
    doc = read_yaml(path, "selection file", f"write one with `supernet snr CKPT --out {path}`", SNRError)
    names = doc.get("trainable") if isinstance(doc, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise SNRError(f"selection file {path} has no `trainable:` list of parameter names; "
                       "write one with `supernet snr CKPT --out FILE`")
    if not names:
        raise SNRError(f"selection file {path} lists no parameter under `trainable`, so nothing would train")
    return names
