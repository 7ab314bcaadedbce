"""`DistillPair`: the student, the frozen teacher and the loss in one module.

Why one module: under FSDP2 the pair is the root unit, so its own parameters (embeddings, final
norms, the lm_heads — tied to the embeddings in SmolLM2) are gathered during its forward. The
fused lm_head loss needs those weights as plain tensors, so it runs inside this forward.

Teacher modes:
* online: `teacher` is a separate frozen model; it runs under no_grad on the same micro-batch.
* self-fa: no separate teacher; the student itself under its teacher placement (all-fa, or swa on a
  sliding teacher's sliding layers), no grad. A converted supernet's teacher placement computes
  exactly the teacher's function, so while the shared weights
  and the fa mixers stay frozen this *is* the teacher, at no extra memory. It is refused when they
  train (the config check says so).
* offline: the teacher's top-K log-probabilities come with the batch (no teacher forward).
* multi: several teachers (`slots`, training/teachers.py), each online (a module of `online`) or
  offline (its top-K in `topks`); each step names the active ones with their weights.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from supernet.layout import Placement
from supernet.training.losses import LossSpec, TopKTargets, fused_lm_head_loss, hidden_match_loss


class DistillPair(nn.Module):
    def __init__(self, student: nn.Module, teacher: nn.Module | None, mode: str, spec: LossSpec,
                 hidden_weight: float = 0.0, hidden_layers: list[int] | None = None,
                 compute_dtype: torch.dtype = torch.float32, activation_weight: float = 0.0,
                 activation_kind: str = "nmse", slots: list[tuple[str, nn.Module | None]] | None = None) -> None:
        super().__init__()
        # multi: (kind, model) per teacher, kind online | offline; the online models are registered
        # in `online` (so they move and cast with the pair), `slot_module` maps teacher -> module index
        self.slot_kinds = [k for k, _ in slots] if slots else None
        self.online = nn.ModuleList([m for k, m in slots or [] if k == "online"])
        self.slot_module: dict[int, int] = {}
        for i, (k, _) in enumerate(slots or []):
            if k == "online":
                self.slot_module[i] = len(self.slot_module)
        # stage 1's mixer-output activation loss (training/transfer.py): each layer's sampled mixer
        # output against the teacher attention's output at that layer
        self.activation_weight = activation_weight
        self.activation_kind = activation_kind
        self.student = student
        self.teacher = teacher  # registered (and so sharded by FSDP2) only for the online mode
        self.mode = mode
        self.spec = spec
        self.hidden_weight = hidden_weight
        n = student.config.num_hidden_layers
        self.hidden_layers = list(range(n)) if hidden_layers is None else list(hidden_layers)
        if any(not 0 <= i < n for i in self.hidden_layers):
            raise ValueError(f"loss.hidden_layers must lie in 0..{n - 1}")
        # the placement that computes the teacher's function (all-fa, or swa on a sliding teacher's
        # sliding layers, e.g. Gemma 3); checkpoints from before the `teacher` preset get all-fa
        self.all_fa = Placement.parse(student.config.teacher_placement(), n)
        if mode == "self-fa":
            for i, m in enumerate(self.all_fa):
                if any(p.requires_grad for p in student.model.layers[i].mixers[m].parameters()):
                    raise ValueError(f"teacher.source self-fa needs the teacher placement's mixers frozen, but layer "
                                     f"{i}'s {m!r} trains; leave {m!r} out of train.train_mixers or use an online teacher")
        if student.config.final_logit_softcapping is not None:
            raise ValueError("distilling a model with final_logit_softcapping is not supported: "
                             "the fused lm_head loss computes uncapped logits")
        self.compute_dtype = compute_dtype

    def _teacher_hidden(self, input_ids: Tensor, want_layers: bool,
                        attn_out: list | None = None) -> tuple[Tensor, tuple[Tensor, ...] | None, Tensor]:
        """(final normed hidden [B,T,D], per-layer hidden states or None, lm_head weight), no grad.
        `attn_out`: a list that receives the teacher attention's output of every layer."""
        from contextlib import nullcontext

        from supernet.training.transfer import capture_io, teacher_attention_modules

        cap = nullcontext(None) if attn_out is None else capture_io(
            teacher_attention_modules(self.student if self.mode == "self-fa" else self.teacher,
                                      self.mode == "self-fa"), want_inputs=False)
        with torch.no_grad(), cap as captured:
            if self.mode == "self-fa":
                out = self.student.model(input_ids=input_ids, placement=self.all_fa, use_cache=False,
                                         output_hidden_states=want_layers)
                weight = self.student.lm_head.weight
            else:
                if hasattr(self.teacher, "unshard"):  # FSDP2 unit, not entered through its forward
                    self.teacher.unshard()
                out = self.teacher.model(input_ids=input_ids, use_cache=False, output_hidden_states=want_layers)
                weight = self.teacher.lm_head.weight
        if attn_out is not None:
            attn_out.extend(captured[1])
        return out.last_hidden_state, out.hidden_states, weight

    def _multi_target(self, input_ids: Tensor, rows: Tensor | None, topks: dict[int, TopKTargets],
                      active: list[tuple[int, float]],
                      temperature: float) -> tuple[Tensor | None, Tensor | None, TopKTargets | None, Any]:
        """(teacher hidden rows, lm_head weight, top-K, mixed) for this step's active teachers: one
        teacher gives exactly its single-teacher signal; several a mixture (training/teachers.py)."""
        from supernet.training.teachers import MixedTeacherLogits, merge_topk

        online, offline = [], []
        for slot, w in active:
            if self.slot_kinds[slot] == "offline":
                offline.append((topks[slot], w))
                continue
            model = self.online[self.slot_module[slot]]
            with torch.no_grad():
                h = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
            h = h.reshape(-1, h.shape[-1])
            online.append((h[rows] if rows is not None else h, model.lm_head.weight, w))
        if len(active) == 1:
            return (online[0][0], online[0][1], None, None) if online else (None, None, offline[0][0], None)
        vocab = self.student.config.vocab_size
        if not online:
            return None, None, merge_topk(offline, vocab), None
        return None, None, None, MixedTeacherLogits(online, offline, temperature, vocab)

    def forward(self, input_ids: Tensor, token_weight: Tensor, placement: Placement, labels: Tensor | None = None,
                rows: Tensor | None = None, topk: TopKTargets | None = None,
                spec: LossSpec | None = None, hidden_weight: float | None = None,
                topks: dict[int, TopKTargets] | None = None,
                active: list[tuple[int, float]] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one micro-batch, already weighted per token (sum over micro-batches = global mean).

        `rows`: flat token positions that carry weight (skip the rest); `topk`: offline teacher
        signals for those rows. Several teachers: `topks` (offline ones, by teacher index) and
        `active` (teacher index, weight). Returns (differentiable loss, detached stats).
        """
        spec = spec or self.spec
        hw = self.hidden_weight if hidden_weight is None else hidden_weight
        want_layers = hw > 0
        aw = self.activation_weight if spec is self.spec else 0.0  # a training forward only
        multi_th = multi_tw = mixed = None
        if self.slot_kinds is not None and spec.kl_weight > 0:
            multi_th, multi_tw, topk, mixed = self._multi_target(input_ids, rows, topks or {}, active,
                                                                 spec.temperature)
        need_teacher = self.slot_kinds is None and ((spec.kl_weight > 0 and topk is None) or want_layers or aw > 0)
        t_final = t_layers = t_weight = None
        t_attn: list | None = [] if aw > 0 else None
        if need_teacher:
            if self.mode == "offline":
                raise ValueError("the offline teacher needs top-K targets with every batch")
            t_final, t_layers, t_weight = self._teacher_hidden(input_ids, want_layers, t_attn)
        from contextlib import nullcontext

        from supernet.training.transfer import capture_io, student_mixer_modules

        s_cap = capture_io(student_mixer_modules(self.student, placement), want_inputs=False) if aw > 0 \
            else nullcontext(None)
        with s_cap as s_captured:
            out = self.student.model(input_ids=input_ids, placement=placement, use_cache=False,
                                     output_hidden_states=want_layers)
        d = out.last_hidden_state.shape[-1]
        h = out.last_hidden_state.reshape(-1, d)
        tw = token_weight.reshape(-1).float()
        lab = labels.reshape(-1) if labels is not None else None
        th = t_final.reshape(-1, d) if t_final is not None else None
        if rows is not None:
            h, tw = h[rows], tw[rows]
            lab = lab[rows] if lab is not None else None
            th = th[rows] if th is not None else None
        if multi_th is not None:
            th, t_weight = multi_th, multi_tw
        logit = fused_lm_head_loss(
            h, self.student.lm_head.weight, tw, spec,
            teacher_hidden=th if spec.kl_weight and topk is None and mixed is None else None,
            teacher_weight=t_weight, topk=topk if spec.kl_weight else None, labels=lab,
            compute_dtype=self.compute_dtype, mixed=mixed,
        )
        if self.teacher is not None and hasattr(self.teacher, "reshard"):
            self.teacher.reshard()
        loss = logit.loss
        stats = {"kl": logit.kl, "ce": logit.ce}
        if want_layers:
            # hidden_states[i + 1] is layer i's output (the last one after the final norm, in both)
            s_h = [out.hidden_states[i + 1] for i in self.hidden_layers]
            t_h = [t_layers[i + 1] for i in self.hidden_layers]
            hid = hidden_match_loss(s_h, t_h, token_weight.float())
            loss = loss + hw * hid
            stats["hidden"] = hid.detach()
        else:
            stats["hidden"] = torch.zeros((), device=loss.device)
        if aw > 0:
            from supernet.training.transfer import activation_loss

            act = sum(activation_loss(s, t, token_weight, self.activation_kind)
                      for s, t in zip(s_captured[1], t_attn)) / len(t_attn)
            loss = loss + aw * act
            stats["act"] = act.detach()
        else:
            stats["act"] = torch.zeros((), device=loss.device)
        return loss, stats
