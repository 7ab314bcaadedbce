"""Self-speculative decoding, measured: draft/target pairs among the presets, timed against plain
greedy decoding of the target on the same prompts (lossless: the outputs must be identical)."""
from __future__ import annotations

import statistics
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
    by_quality = sorted((r for r in rows[1:] if "same_as" not in r), key=lambda r: -r["quality"])
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
                      and r["placement"] != target["placement"] and "same_as" not in r]:
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


WARMUP_STEPS = 3  # a graphed step: two eager warm-ups, then the capture; none of them is timed


def corpus_prompts(tokenizer, texts: Sequence[str], batch: int, length: int) -> torch.Tensor:
    """`batch` prompts of exactly `length` tokens cut from consecutive texts (long contexts at large
    batches need more text than the held-out file alone has: pass the training text after it)."""
    ids: list[int] = []
    rows: list[list[int]] = []
    for text in texts:
        ids += tokenizer(text)["input_ids"]
        while len(ids) >= length and len(rows) < batch:
            rows.append(ids[:length])
            ids = ids[length:]
        if len(rows) == batch:
            return torch.tensor(rows)
    raise ValueError(f"the texts hold fewer than {batch} x {length} tokens; give more text for these prompts")


@torch.no_grad()
def time_target_alone(model: Any, prompts: torch.Tensor, target: Any, new_tokens: int,
                      ks: Sequence[int] = ()) -> tuple[list[list[int]], float, dict[int, float]]:
    """(greedy tokens per row, seconds per decode step, {k: token fraction}) of the target alone,
    static decoding (a replayed CUDA graph on CUDA); the token fraction is the extra cost of each
    further token in a (k+1)-token step, relative to a 1-token step, which the cost model needs."""
    from supernet.cache import SupernetCache
    from supernet.speculative import _StaticRows
    from supernet.static_decode import StaticDecoder

    device = prompts.device
    graphs = device.type == "cuda"
    cache = SupernetCache(model.config.num_hidden_layers)
    first = model(prompts, past_key_values=cache, use_cache=True, placement=target,
                  logits_to_keep=1).logits[:, -1:].argmax(-1)
    decoder = StaticDecoder(model, target, cache, max_new_tokens=new_tokens, cuda_graph=graphs)
    decoder.start(first)
    tokens = [first]
    warm = WARMUP_STEPS if graphs else 1
    for _ in range(warm):
        tokens.append(decoder.step().clone())
    with Stopwatch(device) as timed:
        for _ in range(new_tokens - 1 - warm):
            tokens.append(decoder.step().clone())
    decoder.finish()
    fractions: dict[int, float] = {}
    if ks:
        rows = _StaticRows(model, model.config.resolve(target), cache, capacity=cache.seen_tokens + 4 * max(ks) + 8,
                           lookahead=max(ks) + 1, history_slots=max(ks) + 2,
                           step_tokens=tuple(sorted({1, *[k + 1 for k in ks]})), cuda_graph=graphs)
        position = torch.full((prompts.shape[0],), cache.seen_tokens, device=device)

        def step_time(t: int) -> float:
            feed = torch.zeros(prompts.shape[0], t, dtype=torch.long, device=device)
            for _ in range(WARMUP_STEPS if graphs else 0):
                rows.run(feed, position, slot=1)
            times = []
            for _ in range(5):
                with Stopwatch(device) as sw:
                    for _ in range(10):
                        rows.run(feed, position, slot=1)
                times.append(sw.seconds / 10)
            return sorted(times)[2]

        one = step_time(1)
        fractions = {k: max(0.0, (step_time(k + 1) - one) / (k * one)) for k in ks}
    return torch.cat(tokens, 1).tolist(), timed.seconds / (new_tokens - 1 - warm), fractions


def measure_batched_speculative(model: Any, tokenizer: Any, texts: Sequence[str], rows: list[dict], *,
                                batches: Sequence[int], context: int, new_tokens: int, table: Any,
                                ks: Sequence[int] = (2, 4), min_speedup: float = 1.5,
                                log: Callable[[str], None] = print) -> dict:
    """Self-speculative decoding in the batched engine (supernet/speculative.py, CUDA graphs on CUDA)
    against the target alone (all-fa, rows[0]) at each batch and `context`: every preset measured
    >= `min_speedup` x faster drafts at each k of `ks`; then the cost model (draft_choice.choose_draft
    with this run's cost `table`, the measured per-row acceptances and token fractions) picks a
    (draft, k), which is measured too when it was not among them. Greedy: lossless must hold."""
    from supernet.draft_choice import choose_draft
    from supernet.speculative import speculative_generate

    device = next(model.parameters()).device
    target_row = rows[0]
    target = target_row["placement"]
    drafts = {r["preset"]: r["placement"] for r in rows[1:]
              if r["decode_speedup"] >= min_speedup and r["placement"] != target and "same_as" not in r}
    out: dict[str, Any] = {"target": target_row["preset"], "context": context, "new_tokens": new_tokens,
                           "cuda_graphs": device.type == "cuda", "batches": {}}
    for batch in batches:
        prompts = corpus_prompts(tokenizer, texts, batch, context).to(device)
        want, t_step, fractions = time_target_alone(model, prompts, target, new_tokens, tuple(range(1, 9)))
        log(f"spec batch {batch}: target alone {t_step * 1e3:.2f} ms/step")
        measured: dict[tuple[str, int], dict] = {}

        def run(name: str, k: int) -> dict:
            got, stats = speculative_generate(model, prompts, drafts[name], target, k=k, max_new_tokens=new_tokens)
            tokens = sum(len(r) - 1 for r in got)  # the first token of a row comes from the prefill
            row = {"draft": name, "k": k, "acceptance": stats.acceptance_rate, "alpha": stats.per_token_acceptance,
                   "row_alphas": stats.row_alphas, "tokens_per_round": stats.tokens_per_round,
                   "speedup": t_step / (stats.decode_seconds / (tokens / batch)),
                   "lossless": got == want, "lossless_rows": sum(a == b for a, b in zip(got, want))}
            log(f"  draft {name} k={k}: x{row['speedup']:.2f}, acceptance {row['acceptance']:.2f}, "
                f"lossless {row['lossless']} ({row['lossless_rows']}/{batch} rows)")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return row

        for name in drafts:
            for k in ks:
                measured[(name, k)] = run(name, k)
        pick = None
        if drafts:
            alphas = {n: statistics.fmean(measured[(n, k)]["alpha"] for k in ks) for n in drafts}
            row_alphas = {n: measured[(n, max(ks))]["row_alphas"] for n in drafts}
            # the token fraction measured here, at the k the ranking is asked about (mean over k = 1..8)
            best, _ = choose_draft(model, target, alphas, batch=batch, context=context, table=table,
                                   token_fraction=statistics.fmean(fractions.values()), new_tokens=new_tokens - 1,
                                   row_alphas=row_alphas)
            if best is not None:
                if (best.draft, best.k) not in measured:
                    measured[(best.draft, best.k)] = run(best.draft, best.k)
                pick = {**best.as_dict(), "measured": measured[(best.draft, best.k)]}
        ranked = sorted(measured.values(), key=lambda r: -r["speedup"])
        out["batches"][str(batch)] = {"target_ms_per_step": t_step * 1e3, "token_fraction": fractions,
                                      "rows": list(measured.values()), "best_measured": ranked[0] if ranked else None,
                                      "cost_model_pick": pick}
    return out
