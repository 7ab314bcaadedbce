"""Needle-in-a-haystack retrieval: does a placement still find a fact planted far back in the context?

Linear mixers compress the past into a fixed state and SWA forgets beyond its window, so retrieval at
long context is where cheap placements lose first; perplexity-style metrics hide this.
"""
from __future__ import annotations

import random
from typing import Sequence

import torch

from supernet.model import SupernetForCausalLM
from supernet.layout import PlacementLike

_WORDS = ["amber", "falcon", "harbor", "juniper", "lantern", "meadow", "nickel", "orchid", "pepper",
          "quartz", "saffron", "timber", "velvet", "walnut", "zephyr", "cobalt"]


def build_prompts(tokenizer, haystack: Sequence[str], context: int, depths: Sequence[float], seed: int = 0):
    """(prompt ids, answer ids) pairs: filler text with `The secret word is W.` at each depth."""
    rng = random.Random(seed + context)
    filler_ids: list[int] = []
    for text in haystack:
        filler_ids.extend(tokenizer(text).input_ids)
        if len(filler_ids) > context * 2:
            break
    if len(filler_ids) < context:
        raise ValueError(f"haystack too short for context {context}: {len(filler_ids)} tokens")
    prompts = []
    for depth in depths:
        word = rng.choice(_WORDS)
        needle = tokenizer(f"\nRemember this: the secret word is {word}.\n").input_ids
        question = tokenizer(f"\nQuestion: what is the secret word? Answer: the secret word is").input_ids
        answer = tokenizer(f" {word}").input_ids
        budget = context - len(needle) - len(question)
        cut = int(budget * depth)
        ids = filler_ids[:cut] + needle + filler_ids[cut:budget] + question
        prompts.append((torch.tensor(ids), torch.tensor(answer)))
    return prompts


@torch.no_grad()
def needle_score(
    model: SupernetForCausalLM,
    tokenizer,
    placement: PlacementLike,
    haystack: Sequence[str],
    contexts: Sequence[int] = (2048, 4096, 8192),
    depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
) -> dict[str, float]:
    """Fraction of needles whose answer tokens the model predicts greedily, per context length."""
    device = next(model.parameters()).device
    scores: dict[str, float] = {}
    for ctx in contexts:
        hits = 0
        prompts = build_prompts(tokenizer, haystack, ctx, depths)
        for ids, answer in prompts:
            seq = torch.cat([ids, answer])[None].to(device)
            logits = model(seq[:, :-1], placement=placement, use_cache=False,
                           logits_to_keep=len(answer)).logits
            hits += int(torch.equal(logits[0].argmax(-1).cpu(), answer))
        scores[str(ctx)] = hits / len(prompts)
    return scores
