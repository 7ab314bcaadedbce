"""Rounding bounds that the tests' float tolerances are derived from (instead of from one machine).

A float32 result can differ in its last bits between CPUs (AVX-512 or AVX2 GEMM blocking, the
vector width that decides which elements take a kernel's scalar tail, the thread split of a
reduction), so any comparison of two float32 computations that are not the same kernels on the
same inputs needs a tolerance built from the unit roundoff and the operation count.
"""
from __future__ import annotations

U32 = 2.0**-24  # float32 unit roundoff (round to nearest), ~6e-8
U64 = 2.0**-53  # float64, ~1.1e-16


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of a sum or dot product of n terms
    (relative to the sum of the absolute values of the terms), in any summation order."""
    return n * u / (1.0 - n * u)


def adam_ratio_bound(beta1: float, beta2: float, steps: int) -> float:
    """C >= |m_hat| / sqrt(v_hat) for any gradient sequence of up to `steps` Adam steps.

    m = sum_t w_t g_t and v = sum_t w'_t g_t^2 with w_t = (1-b1) b1^(T-t), w'_t = (1-b2) b2^(T-t);
    by Cauchy-Schwarz |m| <= sqrt(sum_t w_t^2 / w'_t) sqrt(v), and the bias corrections scale both.
    So one AdamW step moves a weight by at most C lr (plus weight decay), whatever the gradients:
    for betas (0.9, 0.95) and a few steps C ~ 1.0.
    """
    worst = 0.0
    for T in range(1, steps + 1):
        s = sum((1 - beta1) ** 2 * beta1 ** (2 * (T - t)) / ((1 - beta2) * beta2 ** (T - t)) for t in range(1, T + 1))
        worst = max(worst, s**0.5 * (1 - beta2**T) ** 0.5 / (1 - beta1**T))
    return worst


def assert_greedy_agrees(got, want, want_logits, logit_tol: float) -> list[int]:
    """Greedy tokens of two computations of the same model (another kernel, a cache, a static
    buffer) agree, except where the reference's top-2 logit margin is within `logit_tol` (twice the
    bound on the two computations' logit difference): there argmax is a tie under rounding and the
    two may rightly part, after which later tokens are not comparable.

    got, want: [B, T] token ids; want_logits: [B, T, V], step t's logits (want[:, t] is their argmax).
    Returns, per row, how many steps are comparable (T when the rows agree throughout).
    """
    comparable = []
    for b in range(want.shape[0]):
        differ = (got[b] != want[b]).nonzero()
        if len(differ) == 0:
            comparable.append(want.shape[1])
            continue
        t = int(differ[0])
        top2 = want_logits[b, t].float().topk(2).values
        margin = float(top2[0] - top2[1])
        assert margin <= logit_tol, (f"row {b} step {t}: token {int(got[b, t])} against {int(want[b, t])}, but the "
                                     f"reference's top-2 margin {margin:.3g} exceeds the rounding bound {logit_tol:.3g}")
        comparable.append(t + 1)  # step t's logits still come from the same prefix
    return comparable
