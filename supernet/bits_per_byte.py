"""Bits per byte: a language model's loss that does not depend on its tokenizer.

Per-token loss cannot compare two tokenizers (a token of one may be three of the other); the
total negative log-likelihood of a text divided by its UTF-8 bytes can. Each text is scored after
one separator token (the tokenizer's EOS, as documents are packed in training), so every token of
the text is predicted and every byte is counted.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch


@torch.no_grad()
def bits_per_byte(model: Any, tokenizer: Any, texts: Sequence[str], max_tokens: int = 1024) -> float:
    """Sum of -log2 p(token) over the texts' tokens / their bytes. Texts longer than `max_tokens`
    tokens are cut at a token boundary, and only the bytes of the kept tokens count."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if sep is None:
        raise ValueError("the tokenizer has neither an EOS nor a BOS token to start a text with")
    nats, nbytes = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        x = torch.tensor([[sep] + ids])
        logits = model(input_ids=x[:, :-1]).logits.float()
        logp = torch.log_softmax(logits, -1)[0].gather(1, x[0, 1:, None]).squeeze(1)
        nats -= float(logp.sum())
        nbytes += len(tokenizer.decode(ids).encode("utf-8"))
    return nats / math.log(2) / nbytes
