"""Self-speculative decoding, measured: draft/target pairs among the presets, timed against plain
greedy decoding of the target on the same prompts (lossless: the outputs must be identical)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from supernet.measure.timer import Stopwatch


def measure_speculative(model: Any, tokenizer: Any, haystack: Sequence[str], rows: list[dict], *, k: int,
                        new_tokens: int, prompts: int, log: Callable[[str], None] = print) -> dict:
    """Try draft/target pairs among the measured presets `rows` (all-fa first, each with `placement`,
    `quality` and `decode_speedup`); report every pair and the best measured speedup.

    Targets: all-fa and the best-quality preset; drafts: presets measured >= 1.5x faster than the target.
    """
    from supernet.generation import greedy_tokens, speculative_tokens

    device = next(model.parameters()).device
    ids = [torch.tensor(tokenizer(t[:1500]).input_ids[:256])[None].to(device) for t in haystack[:prompts]]
    by_quality = sorted(rows[1:], key=lambda r: -r["quality"])
    targets = [rows[0]] + by_quality[:1]
    for row in rows:  # warm-up: kernels compiled and caches allocated before anything is timed
        greedy_tokens(model, ids[0], row["placement"], 4)
    pairs = []
    for target in targets:
        with Stopwatch(device) as plain:
            reference = [greedy_tokens(model, p, target["placement"], new_tokens) for p in ids]
        # a draft is a different placement (timing noise can make a copy of the target, e.g. a non-sliding
        # `teacher` beside all-fa, look 1.5x faster)
        for draft in [r for r in rows if r["decode_speedup"] >= 1.5 * target["decode_speedup"]
                      and r["placement"] != target["placement"]]:
            outs, accepted, drafted = [], 0, 0
            with Stopwatch(device) as spec:
                for p in ids:
                    tokens, stats = speculative_tokens(model, p, draft["placement"], target["placement"],
                                                         k=k, max_new_tokens=new_tokens)
                    outs.append(tokens)
                    accepted += stats.accepted
                    drafted += stats.drafted
            lossless = all(list(a) == list(b) for a, b in zip(outs, reference))
            rate = accepted / max(1, drafted)
            pairs.append({"draft": draft["preset"], "target": target["preset"], "k": k,
                          "acceptance_rate": rate, "speedup": plain.seconds / spec.seconds,
                          "lossless": lossless, "target_seconds": plain.seconds,
                          "speculative_seconds": spec.seconds})
            log(f"spec {draft['preset']} -> {target['preset']}: x{plain.seconds / spec.seconds:.2f}, "
                f"acceptance {rate:.2f}, lossless {lossless}")
    best = max(pairs, key=lambda p: p["speedup"]) if pairs else None
    return {"pairs": pairs, "best": best}
