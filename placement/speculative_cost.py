"""The cost model of self-speculative decoding: predicted speedup of a (draft, k) at a batch and context.

Units are a CostTable's (bytes per generated token of one row for the analytic decode table, or
milliseconds when measured); every cost below is per row.

- The target alone pays C_t = cost(target) per token (one decode step).
- A round pays k draft steps and one verification step of k + 1 tokens:

      R(k) = k * C_d + c_d + C_t + k * c_t

  C_d = cost(draft). c_d and c_t are what one more token adds to a step of the draft and of the
  target ("token cost"): the first draft step reads two tokens, the verification k + 1.
- When a step is memory bound the weights and caches are read once for all its tokens, so the
  token cost is only what each extra token writes: its key/value entries (FA, SWA) or, for GDN/KDA,
  one recurrent state and conv tails into the rollback history. A (k+1)-token verification then
  costs about one step. When a step is compute bound (the CPU, or very large batches) the token
  cost approaches a whole step: pass `token_fraction` = (cost(k+1 tokens) - cost(1)) / (k cost(1)),
  measured, and c = token_fraction * C.
- Each draft is kept with probability alpha given the ones before it were (geometric acceptance;
  `SpecStats.per_token_acceptance` measures it), so a round yields

      E(k) = 1 + alpha + ... + alpha^k = (1 - alpha^(k+1)) / (1 - alpha)   tokens.

- Rows draft together, so a batch of B rows runs until its slowest row is done. A row's gain X
  per round is 1 + min(G, k) with G geometric, P(X = j) = alpha^(j-1) (1 - alpha) for j <= k and
  P(X = k + 1) = alpha^k, independent across rounds and rows; the rounds a row needs for N tokens
  are the renewal count R_N = min{r : X_1 + ... + X_r >= N}, and the batch needs M = max of B
  independent copies:

      E[M] = sum_{r >= 0} (1 - (1 - P(R_N > r))^B),   P(R_N > r) = P(X_1 + ... + X_r < N),

  exact, by convolving X's distribution r times below N (`expected_rounds`, O(N k) per round,
  r < N since X >= 1). Rows differ in acceptance (prompts differ), which the one-alpha form does
  not see: with per-row alphas measured on held-out prompts, a row's alpha is drawn from them
  (`expected_rounds_mixed`: P(R_N <= r) averaged over the alphas, then raised to the power B). The batch then yields N / E[M] tokens per round and row, below E(k) for
  B > 1 (and, by the last round's overshoot, slightly below it at B = 1 for short N).
- Speedup = tokens per round * C_t / R(k). Large batches and long contexts make C_t large through FA's cache
  reads while a GDN/KDA draft stays cheap, which is where speculation pays; at batch 1 and short
  context the shared weights dominate both C_t and C_d and no draft can win.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from supernet.layout import Placement
from supernet.placement.cost import CostTable


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a round yields: kept drafts plus the target's own token."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"acceptance must lie in [0, 1], got {alpha}")
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def tokens_per_round_distribution(alpha: float, k: int) -> np.ndarray:
    """P(X = j) for j = 0 .. k + 1, X = the tokens one row gains in a round (entry 0 is 0)."""
    expected_tokens(alpha, k)  # validates alpha
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    w = np.zeros(k + 2)
    w[1 : k + 1] = alpha ** np.arange(k) * (1.0 - alpha)
    w[k + 1] = alpha**k
    return w


def rounds_survival(alpha: float, k: int, n_tokens: int) -> np.ndarray:
    """P(R_N > r) for r = 0, 1, ...: the chance that one row still lacks tokens after r rounds
    (R_N: rounds to reach `n_tokens`), until it falls below 1e-17 or r reaches N."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    w = tokens_per_round_distribution(alpha, k)
    below = np.zeros(n_tokens)  # P(S_r = s) for s < N
    below[0] = 1.0
    out = []
    for _ in range(n_tokens):
        mass = below.sum()
        out.append(mass)
        if mass < 1e-17:
            break
        below = np.convolve(below, w)[:n_tokens]
    return np.asarray(out)


def expected_rounds(alpha: float, k: int, n_tokens: int, batch: int = 1) -> float:
    """E[max over `batch` rows of R_N]: the rounds a batch drafting together needs for N tokens per row."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return expected_rounds_of_rows([alpha] * batch, k, n_tokens)


def expected_rounds_of_rows(alphas: Iterable[float], k: int, n_tokens: int) -> float:
    """E[max_b R_N(alpha_b)] for rows with their own acceptances (independent rows):
    sum_r (1 - prod_b (1 - P(R_N(alpha_b) > r)))."""
    log_done = np.zeros(n_tokens)  # sum_b log P(R_N(alpha_b) <= r), r = 0 .. N - 1
    count = 0
    for alpha, rows in _counts(alphas).items():
        survive = np.zeros(n_tokens)
        q = rounds_survival(alpha, k, n_tokens)
        survive[: len(q)] = np.clip(q, 0.0, 1.0)  # a sum of probabilities may round above 1
        with np.errstate(divide="ignore"):  # log(0) = -inf where a row cannot be done yet
            log_done += rows * np.log1p(-survive)
        count += rows
    if count == 0:
        raise ValueError("expected_rounds_of_rows needs at least one row")
    return float(np.sum(-np.expm1(log_done)))  # 1 - prod(...) without cancellation for tiny survivals


def expected_rounds_mixed(alphas: Iterable[float], k: int, n_tokens: int, batch: int) -> float:
    """E[max of `batch` rows' R_N] when each row's acceptance is drawn from the measured per-row
    `alphas` (their empirical distribution: prompts differ, so rows do): P(R_N <= r) is the mean over
    `alphas` of P(R_N(alpha) <= r), and E[max] = sum_r 1 - P(R_N <= r)^B. One alpha: `expected_rounds`."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    counts = _counts(alphas)
    total = sum(counts.values())
    if total == 0:
        raise ValueError("expected_rounds_mixed needs at least one measured alpha")
    done = np.zeros(n_tokens)  # P(R_N <= r) of a row drawn from the alphas
    for alpha, rows in counts.items():
        survive = np.zeros(n_tokens)
        q = rounds_survival(alpha, k, n_tokens)
        survive[: len(q)] = np.clip(q, 0.0, 1.0)
        done += rows / total * (1.0 - survive)
    with np.errstate(divide="ignore"):
        return float(np.sum(-np.expm1(batch * np.log(np.clip(done, 0.0, 1.0)))))


def _counts(alphas: Iterable[float]) -> dict[float, int]:
    out: dict[float, int] = {}
    for a in alphas:
        out[float(a)] = out.get(float(a), 0) + 1
    return out


def batch_tokens_per_round(alpha: float, k: int, n_tokens: int, batch: int,
                           row_alphas: Iterable[float] | None = None) -> float:
    """Tokens per round and row when the slowest of `batch` rows sets the number of rounds; with
    measured `row_alphas`, rows drawn from them (`expected_rounds_mixed`), else all at `alpha`."""
    rows = list(row_alphas or [])
    rounds = expected_rounds_mixed(rows, k, n_tokens, batch) if rows else expected_rounds(alpha, k, n_tokens, batch)
    return n_tokens / rounds


def token_write_bytes(config: Any, mixer: str, dtype_bytes: int = 2, state_bytes: int = 4) -> float:
    """Bytes one more token of a step writes in one layer's mixer (see the module docstring)."""
    if mixer in ("fa", "swa"):
        return 2.0 * config.num_key_value_heads * config.head_dim * dtype_bytes
    conv = config.linear_conv_size - 1
    if mixer == "gdn":
        h, hv, k, v = config.gdn_num_heads, config.gdn_num_v_heads, config.gdn_head_dim, config.gdn_v_head_dim
        return hv * k * v * state_bytes + (2 * h * k + hv * v) * conv * dtype_bytes
    if mixer == "kda":
        h, k, v = config.kda_num_heads, config.kda_head_dim, config.kda_v_head_dim
        return h * k * v * state_bytes + (2 * h * k + h * v) * conv * dtype_bytes
    raise ValueError(f"unknown mixer {mixer!r}")


def token_cost(table: CostTable, placement: Placement, config: Any | None = None,
               token_fraction: float | None = None) -> float:
    """What one more token adds to a step of `placement`: measured fraction, or the bytes it writes."""
    if token_fraction is not None:
        return token_fraction * table.cost(placement)
    if config is None or table.unit != "bytes/token":
        raise ValueError("the token cost needs the config and an analytic bytes table, or a measured token_fraction")
    dtype_bytes = table.meta.get("dtype_bytes", 2)
    state_bytes = table.meta.get("state_bytes", 4)
    return sum(token_write_bytes(config, m, dtype_bytes, state_bytes) for m in placement)


@dataclass(frozen=True)
class Prediction:
    draft: str
    k: int
    alpha: float
    tokens_per_round: float
    round_cost: float
    target_cost: float
    batch: int = 1
    new_tokens: int | None = None  # set: tokens_per_round charges the slowest of `batch` rows

    @property
    def speedup(self) -> float:
        return self.tokens_per_round * self.target_cost / self.round_cost

    def as_dict(self) -> dict[str, float | str | int]:
        return {"draft": self.draft, "k": self.k, "alpha": self.alpha, "tokens_per_round": self.tokens_per_round,
                "round_cost": self.round_cost, "target_cost": self.target_cost, "batch": self.batch,
                "new_tokens": self.new_tokens, "predicted_speedup": self.speedup}


def predict(table: CostTable, target: Placement, draft: Placement, alpha: float, k: int, *, name: str = "draft",
            config: Any | None = None, token_fraction: float | None = None, batch: int = 1,
            new_tokens: int | None = None, row_alphas: Iterable[float] | None = None) -> Prediction:
    """The speedup of drafting with `draft` (k per round) over the target alone (module docstring).

    With `new_tokens` (tokens per row after the first), the rounds are the slowest of `batch` rows'
    (`expected_rounds`, or `expected_rounds_mixed` over measured `row_alphas`); without it, the
    long-run E(k) of one row."""
    return predict_from_costs(table.cost(target), table.cost(draft), token_cost(table, target, config, token_fraction),
                              token_cost(table, draft, config, token_fraction), alpha, k, name=name, batch=batch,
                              new_tokens=new_tokens, row_alphas=row_alphas)


def predict_from_costs(c_t: float, c_d: float, extra_t: float, extra_d: float, alpha: float, k: int, *,
                       name: str = "draft", batch: int = 1, new_tokens: int | None = None,
                       row_alphas: Iterable[float] | None = None) -> Prediction:
    """The formula itself, from step costs (C_t, C_d) and token costs (c_t, c_d) in one unit."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    round_cost = k * c_d + extra_d + c_t + k * extra_t
    tokens = expected_tokens(alpha, k) if new_tokens is None else \
        batch_tokens_per_round(alpha, k, new_tokens, batch, row_alphas)
    return Prediction(name, k, alpha, tokens, round_cost, c_t, batch, new_tokens)


def rank(table: CostTable, target: Placement, drafts: dict[str, tuple[Placement, float]],
         ks: Iterable[int] = range(1, 9), row_alphas: dict[str, list[float]] | None = None,
         **kwargs: Any) -> list[Prediction]:
    """Every (draft, k), best predicted speedup first; `drafts` maps name -> (placement, alpha),
    `row_alphas` (optional) name -> measured per-row alphas."""
    row_alphas = row_alphas or {}
    out = [predict(table, target, p, alpha, k, name=name, row_alphas=row_alphas.get(name), **kwargs)
           for name, (p, alpha) in drafts.items() for k in ks]
    return sorted(out, key=lambda r: -r.speedup)
