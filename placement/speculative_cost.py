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

- Speedup = E(k) * C_t / R(k). Large batches and long contexts make C_t large through FA's cache
  reads while a GDN/KDA draft stays cheap, which is where speculation pays; at batch 1 and short
  context the shared weights dominate both C_t and C_d and no draft can win.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from supernet.layout import Placement
from supernet.placement.cost import CostTable


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a round yields: kept drafts plus the target's own token."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"acceptance must lie in [0, 1], got {alpha}")
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


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

    @property
    def speedup(self) -> float:
        return self.tokens_per_round * self.target_cost / self.round_cost

    def as_dict(self) -> dict[str, float | str | int]:
        return {"draft": self.draft, "k": self.k, "alpha": self.alpha, "tokens_per_round": self.tokens_per_round,
                "round_cost": self.round_cost, "target_cost": self.target_cost, "predicted_speedup": self.speedup}


def predict(table: CostTable, target: Placement, draft: Placement, alpha: float, k: int, *, name: str = "draft",
            config: Any | None = None, token_fraction: float | None = None) -> Prediction:
    """The speedup of drafting with `draft` (k per round) over the target alone (module docstring)."""
    return predict_from_costs(table.cost(target), table.cost(draft), token_cost(table, target, config, token_fraction),
                              token_cost(table, draft, config, token_fraction), alpha, k, name=name)


def predict_from_costs(c_t: float, c_d: float, extra_t: float, extra_d: float, alpha: float, k: int, *,
                       name: str = "draft") -> Prediction:
    """The formula itself, from step costs (C_t, C_d) and token costs (c_t, c_d) in one unit."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    round_cost = k * c_d + extra_d + c_t + k * extra_t
    return Prediction(name, k, alpha, expected_tokens(alpha, k), round_cost, c_t)


def rank(table: CostTable, target: Placement, drafts: dict[str, tuple[Placement, float]],
         ks: Iterable[int] = range(1, 9), **kwargs: Any) -> list[Prediction]:
    """Every (draft, k), best predicted speedup first; `drafts` maps name -> (placement, alpha)."""
    out = [predict(table, target, p, alpha, k, name=name, **kwargs)
           for name, (p, alpha) in drafts.items() for k in ks]
    return sorted(out, key=lambda r: -r.speedup)
