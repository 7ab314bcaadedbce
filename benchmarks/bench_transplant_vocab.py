"""Vocabulary transplant of the real SmolLM2-135M to tokenizers trained on the corpus: bits per byte.

The teacher (49152 tokens) gets the vocabulary of a byte-level BPE trained here on pydocs-train
(`--sizes`, default 4096), without any training, and is scored on held-out pydocs-eval text in bits
per byte (tokenizers differ, so per-token loss would not compare). Rows, all in one run: the
original model; the transplant with matching pursuit over k shared tokens (k = 8: the default,
k = 1: the nearest shared token only) and with the plain mean of the old pieces (k = 0); and the
same model with randomly initialised embeddings (the original's std).

    .venv/bin/python -m benchmarks.bench_transplant_vocab [--sizes 4096,16384] [--texts 4] [--chars 3000]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.common import print_table, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4096")
    ap.add_argument("--ks", default="8,1,0")
    ap.add_argument("--texts", type=int, default=4)
    ap.add_argument("--chars", type=int, default=3000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from supernet.bits_per_byte import bits_per_byte
    from supernet.teacher import smollm2_hf_dir
    from supernet.training.tiny import train_byte_level_bpe
    from supernet.vocab_transplant import transplant_model

    data = Path(os.environ.get("SUPERNET_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    train = [json.loads(x)["text"] for x in (data / "pydocs-train.jsonl").read_text().splitlines()[:200]]
    held = [json.loads(x)["text"] for x in (data / "pydocs-eval.jsonl").read_text().splitlines()]
    texts = [t[: args.chars] for t in held if len(t) >= args.chars][: args.texts]
    folder = smollm2_hf_dir()
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    old_tok = AutoTokenizer.from_pretrained(folder)
    rows = []
    t0 = time.time()
    b0 = bits_per_byte(original, old_tok, texts)
    rows.append({"tokenizer": f"original ({len(old_tok)})", "method": "-", "bits_per_byte": b0, "ratio": 1.0})
    print(f"original: {b0:.4f} bits/byte ({time.time() - t0:.0f} s)", flush=True)
    std = float(original.get_input_embeddings().weight.detach().std())
    for size in [int(x) for x in args.sizes.split(",")]:
        new_tok = train_byte_level_bpe(train, size)
        model = None
        for k in [int(x) for x in args.ks.split(",")]:
            model = copy.deepcopy(original)
            report = transplant_model(model, old_tok, new_tok, k=k)
            b = bits_per_byte(model, new_tok, texts)
            rows.append({"tokenizer": f"bpe-{size}", "method": f"omp k={k}" if k else "mean of pieces",
                         "bits_per_byte": b, "ratio": b / b0, "copied": report.copied,
                         "approximated": report.approximated, "mean_init": report.mean_init})
            print(f"bpe-{size} k={k}: {b:.4f} bits/byte ({b / b0:.2f}x)", flush=True)
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, std, generator=torch.Generator().manual_seed(0))
        b = bits_per_byte(model, new_tok, texts)
        rows.append({"tokenizer": f"bpe-{size}", "method": "random embedding", "bits_per_byte": b, "ratio": b / b0})
    print_table(rows, ["tokenizer", "method", "bits_per_byte", "ratio", "copied", "approximated", "mean_init"],
                f"SmolLM2-135M vocabulary transplant, held-out pydocs-eval ({len(texts)} x {args.chars} chars)")
    write_results("transplant_vocab_smollm2", {"texts": len(texts), "chars": args.chars, "rows": rows,
                                               "wall_s": time.time() - t0}, args.out)


if __name__ == "__main__":
    main()
