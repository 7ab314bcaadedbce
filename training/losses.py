"""Distillation losses, computed chunk by chunk with the lm_head fused in.

Full-vocabulary logits are the memory hog of distillation (32k tokens x 49k vocab x 4 bytes = 6.4 GB
per fp32 tensor, and autograd keeps several). `fused_lm_head_loss` never stores them: for each
chunk of tokens it computes student logits (and teacher logits, or reads the teacher's top-K),
the per-token loss and its gradient with respect to the logits *in the forward pass*, and keeps
only the gradients for the hidden states and the lm_head weight. Backward then just scales them.

Definitions (z = student logits, p = teacher distribution, q = softmax(z / tau), per token):
* fkl: tau^2 * KL(p || q) = tau^2 * sum_v p_v (log p_v - log q_v)  (Hinton's tau^2 keeps gradients
  comparable across temperatures);  d/dz = tau * (q - p).
* rkl: tau^2 * KL(q || p);  mix: (1 - a) * fkl + a * rkl with a = `kl_mix` (mode-covering plus
  mode-seeking; both have their minimum at q = p);  jsd: tau^2 * (KL(p || m) + KL(q || m)) / 2 with m = (p + q) / 2.
* top-K (offline cache): the teacher gives p_1..p_K on ids i_1..i_K and tail mass
  t_p = 1 - sum_k p_k. The student is bucketed the same way: q_{i_1}..q_{i_K} and
  t_q = 1 - sum_k q_{i_k}. loss = tau^2 * [sum_k p_k log(p_k / q_{i_k}) + t_p log(t_p / t_q)], a KL
  over K+1 buckets; with K = vocab it equals fkl. d/dz_j = tau * (q_j * (sum p + t_p) - r_j) with
  r_j = p_j on the K ids and r_j = t_p * q_j / t_q elsewhere (the tail spread like the student's).
* ce: cross-entropy of the next token at temperature 1.
Each token's loss is multiplied by its weight (mask / number of target tokens of the global batch),
so sums over micro-batches and ranks give the exact global mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

TAIL_EPS = 1e-12


@dataclass
class TopKTargets:
    """Teacher signals read from an offline cache, for the selected tokens."""

    ids: Tensor  # [N, K] int64
    logprobs: Tensor  # [N, K] float32, at the cache's temperature
    tail: Tensor  # [N] float32, 1 - sum(exp(logprobs)) computed before rounding
    # [N, K] bool or None: False marks a padding slot (rows of a merged target hold different
    # numbers of ids); a padding slot repeats a real slot's id and value and is left out of the sums
    valid: Tensor | None = None

    def select(self, rows: Tensor) -> "TopKTargets":
        return TopKTargets(self.ids[rows], self.logprobs[rows], self.tail[rows],
                           None if self.valid is None else self.valid[rows])


@dataclass
class LossSpec:
    kind: str = "fkl"  # fkl | rkl | jsd
    temperature: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    chunk_tokens: int = 4096
    compiled: bool = False  # torch.compile the per-chunk forward-KL math (worth it on GPUs)
    kl_mix: float = 0.5  # kind mix: the reverse-KL share


# ---------------------------------------------------------------------------------------------
# per-chunk terms: return (weighted loss per token, kl per token, ce per token, dloss/dz)
# ---------------------------------------------------------------------------------------------
def _fkl_full(z: Tensor, zt: Tensor, tau: float, row_scale: Tensor, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Forward KL per token and d(row_scale * KL)/dz, from raw (any-dtype) logits of one chunk."""
    z = z.float()
    zt = zt.float()
    if tau != 1.0:
        z = z / tau
        zt = zt / tau
    log_q = torch.log_softmax(z, dim=-1)
    log_p = torch.log_softmax(zt, dim=-1)
    p = log_p.exp()
    kl = (p * (log_p - log_q)).sum(-1) * (tau * tau)
    grad = (log_q.exp() - p) * (tau * row_scale)[:, None]
    return kl, grad.to(out_dtype)


_COMPILED: dict[str, object] = {}


def _fkl_kernel(compiled: bool):
    """`_fkl_full`, optionally through torch.compile (fuses ~10 passes over the logits into ~3)."""
    if not compiled:
        return _fkl_full
    if "fkl" not in _COMPILED:
        _COMPILED["fkl"] = torch.compile(_fkl_full, dynamic=True)
    fn = _COMPILED["fkl"]

    def safe(*args):
        try:
            return fn(*args)
        except Exception as exc:  # a compiler problem must not stop training: fall back to eager
            import warnings

            warnings.warn(f"torch.compile of the KL kernel failed ({type(exc).__name__}); using eager")
            _COMPILED["fkl"] = _fkl_full
            return _fkl_full(*args)

    return safe


def _fkl_topk(z: Tensor, tk: TopKTargets, tau: float) -> tuple[Tensor, Tensor]:
    q = torch.softmax(z / tau, dim=-1)
    qk = q.gather(1, tk.ids)
    p = tk.logprobs.exp()
    terms = p * (tk.logprobs - torch.log(qk.clamp_min(1e-30)))
    if tk.valid is not None:  # padding slots count once, through the real slot they repeat
        qk, p, terms = qk * tk.valid, p * tk.valid, terms * tk.valid
    tail_q = (1.0 - qk.sum(-1)).clamp_min(TAIL_EPS)
    tail_p = tk.tail.clamp_min(0.0)
    kl = terms.sum(-1)
    kl = kl + torch.xlogy(tail_p, tail_p) - tail_p * torch.log(tail_q)
    total_p = p.sum(-1) + tail_p
    r = q * (tail_p / tail_q).unsqueeze(-1)  # tail spread like the student
    # a padding slot writes the same value to the same id as the slot it repeats: deterministic
    r.scatter_(1, tk.ids, p if tk.valid is None else tk.logprobs.exp())
    grad = (q.mul_(total_p.unsqueeze(-1)) - r).mul_(tau)
    return kl * tau * tau, grad


def _divergence_autograd(z: Tensor, zt: Tensor, tau: float, kind: str, mix: float = 0.5) -> tuple[Tensor, Tensor]:
    """rkl / jsd / mix through autograd on one chunk (off the hot path)."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        log_q = torch.log_softmax(z / tau, dim=-1)
        log_p = torch.log_softmax(zt / tau, dim=-1)
        if kind == "rkl":
            kl = (log_q.exp() * (log_q - log_p)).sum(-1)
        elif kind == "mix":
            fwd = (log_p.exp() * (log_p - log_q)).sum(-1)
            rev = (log_q.exp() * (log_q - log_p)).sum(-1)
            kl = (1.0 - mix) * fwd + mix * rev
        elif kind == "jsd":
            log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - torch.log(torch.tensor(2.0))
            kl = 0.5 * ((log_p.exp() * (log_p - log_m)).sum(-1) + (log_q.exp() * (log_q - log_m)).sum(-1))
        else:
            raise ValueError(f"unknown loss kind {kind!r}")
        kl = kl * tau * tau
        (grad,) = torch.autograd.grad(kl.sum(), z)
    return kl.detach(), grad


def _ce(z: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    log_q = torch.log_softmax(z, dim=-1)
    safe = labels.clamp_min(0)
    ce = -log_q.gather(1, safe[:, None]).squeeze(1)
    grad = log_q.exp_()
    grad.scatter_add_(1, safe[:, None], torch.full_like(ce[:, None], -1.0))
    valid = (labels >= 0).to(z.dtype)
    return ce * valid, grad * valid[:, None]


class _FusedLMHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, token_weight, teacher_hidden, teacher_weight, topk_ids,
                topk_logprobs, topk_tail, labels, spec: LossSpec, compute_dtype: torch.dtype, need_grad: bool,
                topk_valid=None, mixed=None):
        n = hidden.shape[0]
        cd = compute_dtype
        w_c = weight.detach().to(cd)
        tw_c = None
        if teacher_hidden is not None:
            tw_c = w_c if teacher_weight is weight else teacher_weight.detach().to(cd)
        if mixed is not None:
            mixed.prepare(cd)
        want_gw = need_grad and ctx.needs_input_grad[1]
        want_gh = need_grad and ctx.needs_input_grad[0]
        grad_h = torch.empty_like(hidden) if want_gh else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_gw else None
        loss = hidden.new_zeros((), dtype=torch.float32)
        kl_sum = hidden.new_zeros((), dtype=torch.float32)
        ce_sum = hidden.new_zeros((), dtype=torch.float32)
        tau = spec.temperature
        step = max(1, spec.chunk_tokens)
        fkl = _fkl_kernel(spec.compiled)
        for s in range(0, n, step):
            e = min(n, s + step)
            h = hidden[s:e].detach().to(cd)
            z = h @ w_c.t()  # [n, V] in the compute dtype; the kernels upcast to fp32
            tw = token_weight[s:e].float()
            grad = None
            if spec.kl_weight:
                if topk_ids is not None:
                    kl, g = _fkl_topk(z.float(), TopKTargets(topk_ids[s:e], topk_logprobs[s:e].float(),
                                                             topk_tail[s:e].float(),
                                                             None if topk_valid is None else topk_valid[s:e]), tau)
                    g.mul_((spec.kl_weight * tw)[:, None])
                else:
                    zt = mixed.logits(s, e) if mixed is not None else teacher_hidden[s:e].to(cd) @ tw_c.t()
                    if spec.kind == "fkl":
                        out_dtype = torch.float32 if spec.ce_weight else cd
                        kl, g = fkl(z, zt, tau, spec.kl_weight * tw, out_dtype)
                    else:
                        kl, g = _divergence_autograd(z.float(), zt.float(), tau, spec.kind, spec.kl_mix)
                        g.mul_((spec.kl_weight * tw)[:, None])
                    del zt
                kl_sum += (kl * tw).sum()
                loss += spec.kl_weight * (kl * tw).sum()
                grad = g
            if spec.ce_weight:
                ce, g = _ce(z.float(), labels[s:e])
                ce_sum += (ce * tw).sum()
                loss += spec.ce_weight * (ce * tw).sum()
                g.mul_((spec.ce_weight * tw)[:, None])
                grad = g if grad is None else grad.float().add_(g)
            del z
            if not (want_gh or want_gw):
                continue
            if grad is None:
                if want_gh:
                    grad_h[s:e] = 0
                continue
            g_c = grad.to(cd)
            del grad
            if want_gh:
                grad_h[s:e] = (g_c @ w_c).to(grad_h.dtype)
            if want_gw:
                grad_w += (g_c.t() @ h).float()
        empty = torch.empty(0)
        ctx.save_for_backward(grad_h if want_gh else empty, grad_w if want_gw else empty)
        ctx.want_gw, ctx.want_gh = want_gw, want_gh
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(kl_sum, ce_sum)
        return loss, kl_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss, _gk, _gc):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_loss.to(grad_h.dtype) if ctx.want_gh else None
        gw = (grad_w * grad_loss).to(ctx.weight_dtype) if ctx.want_gw else None
        return gh, gw, None, None, None, None, None, None, None, None, None, None, None, None


@dataclass
class LogitLossOutput:
    loss: Tensor  # differentiable: kl_weight * KL + ce_weight * CE (weighted sums)
    kl: Tensor  # sum over tokens of weight * KL (detached)
    ce: Tensor  # sum over tokens of weight * CE (detached)


def fused_lm_head_loss(
    hidden: Tensor,
    weight: Tensor,
    token_weight: Tensor,
    spec: LossSpec,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    topk: TopKTargets | None = None,
    labels: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
    mixed: "MixedTeacherLogits | None" = None,
) -> LogitLossOutput:
    """Loss of the student's lm_head on `hidden` [N, D] against the teacher, chunked over tokens.

    Give exactly one teacher signal when spec.kl_weight > 0: `teacher_hidden` (final, normed
    hidden states [N, D]) with `teacher_weight` (teacher lm_head [V, D]), or `topk`. `labels` [N]
    (-100 = ignore) is needed when spec.ce_weight > 0. `mixed` (several teachers,
    training/teachers.py) stands in for teacher_hidden: it gives each chunk's target logits.
    """
    if spec.kl_weight and sum(x is not None for x in (teacher_hidden, topk, mixed)) != 1:
        raise ValueError("give exactly one of teacher_hidden, topk or mixed when kl_weight > 0")
    if spec.ce_weight and labels is None:
        raise ValueError("ce_weight > 0 needs labels")
    if topk is not None and spec.kind != "fkl":
        raise ValueError("the top-K loss supports kind fkl only")
    if teacher_hidden is not None and teacher_weight is None:
        raise ValueError("teacher_hidden needs teacher_weight")
    ids = topk.ids if topk is not None else None
    lps = topk.logprobs if topk is not None else None
    tail = topk.tail if topk is not None else None
    valid = topk.valid if topk is not None else None
    loss, kl, ce = _FusedLMHeadLoss.apply(hidden, weight, token_weight, teacher_hidden, teacher_weight,
                                          ids, lps, tail, labels, spec, compute_dtype,
                                          torch.is_grad_enabled(), valid, mixed)
    return LogitLossOutput(loss, kl, ce)


def hidden_match_loss(student: list[Tensor], teacher: list[Tensor], token_weight: Tensor) -> Tensor:
    """Mean over layers of sum_t w_t * |h_s - h_t|^2 / (|h_t|^2 + eps): relative error per token.

    Relative, so layers with large activations do not dominate; weighted per token like the logit
    losses, so sums over micro-batches and ranks give the global mean.
    """
    if not student:
        return token_weight.new_zeros(())
    total = token_weight.new_zeros((), dtype=torch.float32)
    for hs, ht in zip(student, teacher):
        hs = hs.float()
        ht = ht.detach().float()
        err = (hs - ht).pow(2).sum(-1) / (ht.pow(2).sum(-1) + 1e-6)
        total = total + (err * token_weight).sum()
    return total / len(student)


# ---------------------------------------------------------------------------------------------
# plain (unfused) references, used by the tests and the baseline benchmark
# ---------------------------------------------------------------------------------------------
def reference_logit_loss(student_logits: Tensor, token_weight: Tensor, spec: LossSpec, *,
                         teacher_logits: Tensor | None = None, topk: TopKTargets | None = None,
                         labels: Tensor | None = None) -> Tensor:
    """The same quantity as `fused_lm_head_loss(...).loss`, from full logits with autograd."""
    tau = spec.temperature
    z = student_logits.float()
    total = z.new_zeros(())
    if spec.kl_weight:
        log_q = torch.log_softmax(z / tau, -1)
        if topk is not None:
            lqk = log_q.gather(1, topk.ids)
            tail_q = (1 - lqk.exp().sum(-1)).clamp_min(TAIL_EPS)
            p = topk.logprobs.exp()
            kl = (p * (topk.logprobs - lqk)).sum(-1) + torch.xlogy(topk.tail, topk.tail) - topk.tail * tail_q.log()
        else:
            log_p = torch.log_softmax(teacher_logits.float() / tau, -1)
            if spec.kind == "fkl":
                kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
            elif spec.kind == "rkl":
                kl = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
            elif spec.kind == "mix":
                kl = (1 - spec.kl_mix) * F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1) \
                    + spec.kl_mix * F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
            else:
                log_m = torch.logsumexp(torch.stack([log_p, log_q]), 0) - torch.log(torch.tensor(2.0))
                kl = 0.5 * (F.kl_div(log_m, log_p, log_target=True, reduction="none").sum(-1)
                            + F.kl_div(log_m, log_q, log_target=True, reduction="none").sum(-1))
        total = total + spec.kl_weight * (kl * tau * tau * token_weight).sum()
    if spec.ce_weight:
        ce = F.cross_entropy(z, labels, ignore_index=-100, reduction="none")
        total = total + spec.ce_weight * (ce * token_weight).sum()
    return total


def topk_from_logits(logits: Tensor, k: int, temperature: float = 1.0) -> TopKTargets:
    """Teacher logits [N, V] -> top-K log-probs at `temperature` plus the exact tail mass."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    vals, ids = logp.topk(k, dim=-1)
    tail = (1.0 - vals.exp().sum(-1)).clamp_min(0.0)
    return TopKTargets(ids, vals, tail)
