"""Layer-local transfer (`stage: transfer`) and the mixer-output activation loss of stage 1.

Why a stage of its own: the teacher's hidden states do not depend on the student's mixers, so one
teacher pass gives, for every layer l, the input its attention saw (x_l, after the layer's input
norm) and the attention's output y_l. Every trainable mixer m of every layer can then be trained at
once on (x_l -> y_l), with no placement to sample: a step trains L x |mixers| mixers where an
end-to-end step trains L. The objective is a regression, not a logit loss, so it has no lm_head,
no sampler and no gradient routing through later layers.

Loss (per token t, normalised so that layers with large activations do not dominate):
    nmse: |m(x_t) - y_t|^2 / (|y_t|^2 + eps);   mse: |m(x_t) - y_t|^2 / D
weighted by the trainer's token weights (mask / target tokens of the global batch), averaged over
the (layer, mixer) pairs. A mixer that computes the teacher's attention (FA, or SWA whose window
covers the sequence) has zero loss up to float rounding.

Memory: the captured x_l, y_l are 2 L B T D numbers. With `transfer.checkpoint` each chunk of
`transfer.layers_per_chunk` layers is one activation-checkpointed region whose forward returns only
its scalar loss, so at most one chunk's mixer internals are alive; backward recomputes them chunk
by chunk.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from supernet.layout import Placement
from supernet.training.engine import DistillPair
from supernet.training.losses import LossSpec, TopKTargets

NMSE_EPS = 1e-6


def teacher_attention_modules(model: nn.Module, self_fa: bool) -> list[nn.Module]:
    """The module per layer whose input/output define the teacher's attention.

    An HF Llama teacher: `model.layers[i].self_attn`; the student itself (`self-fa`): its fa mixers.
    """
    layers = model.model.layers
    return [layer.mixers["fa"] for layer in layers] if self_fa else [layer.self_attn for layer in layers]


@contextmanager
def capture_io(modules: list[nn.Module], want_inputs: bool = True) -> Iterator[tuple[list, list]]:
    """Record (input hidden state, output) of each module's next forward, through forward hooks.

    Hooks rather than a hand-written layer loop: the teacher's own forward (HF's masks, RoPE,
    FSDP2's unshard hooks) runs unchanged, and the capture is the exact tensors it used.
    """
    inputs: list = [None] * len(modules)
    outputs: list = [None] * len(modules)

    def make(i: int):
        def hook(_mod, args, kwargs, out):
            if want_inputs:
                inputs[i] = args[0] if args else kwargs["hidden_states"]
            outputs[i] = out[0] if isinstance(out, tuple) else out

        return hook

    handles = [m.register_forward_hook(make(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        yield inputs, outputs
    finally:
        for h in handles:
            h.remove()


def activation_loss(pred: Tensor, target: Tensor, token_weight: Tensor, kind: str = "nmse") -> Tensor:
    """sum_t w_t * err_t with err the normalised (nmse) or per-dimension (mse) squared error."""
    p = pred.float()
    y = target.detach().float()
    sq = (p - y).pow(2).sum(-1)
    err = sq / (y.pow(2).sum(-1) + NMSE_EPS) if kind == "nmse" else sq / y.shape[-1]
    return (err * token_weight.reshape(err.shape).float()).sum()


class TransferPair(DistillPair):
    """DistillPair whose training forward is the layer-local transfer loss.

    Called with an explicit `spec` (the trainer's held-out evaluation) it is the plain DistillPair,
    so a transfer run reports the same held-out KL per placement as stage 1.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, mode: str, spec: LossSpec,
                 mixers: list[str], loss_kind: str = "nmse", layers_per_chunk: int = 0,
                 use_checkpoint: bool = False, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(student, teacher, mode, spec, 0.0, None, compute_dtype)
        if mode not in ("online", "self-fa"):
            raise ValueError("stage transfer needs the teacher's hidden states: teacher.source online or self-fa")
        n = student.config.num_hidden_layers
        # (layer, mixer) pairs that train: a mixer is in the list and has trainable weights
        self.pairs: list[tuple[int, str]] = []
        for i, layer in enumerate(student.model.layers):
            for m in mixers:
                if m in layer.mixers and any(p.requires_grad for p in layer.mixers[m].parameters()):
                    self.pairs.append((i, m))
        if not self.pairs:
            raise ValueError("stage transfer has no trainable mixer: make transfer.mixers overlap train.train_mixers")
        self.loss_kind = loss_kind
        self.chunk = layers_per_chunk if layers_per_chunk > 0 else n
        self.use_checkpoint = use_checkpoint

    def compile_mixers(self, backend: str = "inductor") -> None:
        """torch.compile every trained (layer, mixer) module in place (static shapes; the teacher
        pass and evaluation stay eager: they run under no_grad and once per step)."""
        from supernet.training.compile import configure_dynamo

        configure_dynamo(True)
        for i, m in self.pairs:
            self.student.model.layers[i].mixers[m].compile(backend=backend, dynamic=False)

    def teacher_io(self, input_ids: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(x_l, y_l) for every layer from one no-grad teacher forward."""
        self_fa = self.mode == "self-fa"
        model = self.student if self_fa else self.teacher
        with torch.no_grad(), capture_io(teacher_attention_modules(model, self_fa)) as (xs, ys):
            if self_fa:
                self.student.model(input_ids=input_ids, placement=self.all_fa, use_cache=False)
            else:
                if hasattr(self.teacher, "unshard"):
                    self.teacher.unshard()
                self.teacher.model(input_ids=input_ids, use_cache=False)
        if self.teacher is not None and hasattr(self.teacher, "reshard"):
            self.teacher.reshard()
        return list(xs), list(ys)

    def _chunk_loss(self, pairs: list[tuple[int, str]], xs: list[Tensor], ys: list[Tensor],
                    cos: Tensor, sin: Tensor, tw: Tensor) -> Tensor:
        total = tw.new_zeros((), dtype=torch.float32)
        layers = self.student.model.layers
        for i, m in pairs:
            mixer = layers[i].mixers[m]
            # the teacher's tensors may be bf16 (train.frozen_bf16); the mixer takes its own dtype
            # (under bf16 autocast its matmuls still run in bf16)
            x = xs[i].to(next(mixer.parameters()).dtype)
            out = mixer(x, (cos.to(x.dtype), sin.to(x.dtype)), None)
            total = total + activation_loss(out, ys[i], tw, self.loss_kind)
        return total

    def forward(self, input_ids: Tensor, token_weight: Tensor, placement: Placement | None = None,
                labels: Tensor | None = None, rows: Tensor | None = None, topk: TopKTargets | None = None,
                spec: LossSpec | None = None, hidden_weight: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if spec is not None:  # evaluation: the logit loss of a placement
            return super().forward(input_ids, token_weight, placement, labels, rows, topk, spec, 0.0)
        xs, ys = self.teacher_io(input_ids)
        b, t = input_ids.shape
        pos = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, -1)
        # RoPE tables in float32 (as the student's own forward makes them from its fp32 hidden states)
        cos, sin = self.student.model.rotary_emb(xs[0].float(), pos)
        tw = token_weight.float()
        total = tw.new_zeros((), dtype=torch.float32)
        n = self.student.config.num_hidden_layers
        for start in range(0, n, self.chunk):
            pairs = [(i, m) for i, m in self.pairs if start <= i < start + self.chunk]
            if not pairs:
                continue
            if self.use_checkpoint and torch.is_grad_enabled():
                part = checkpoint(self._chunk_loss, pairs, xs, ys, cos, sin, tw, use_reentrant=False)
            else:
                part = self._chunk_loss(pairs, xs, ys, cos, sin, tw)
            total = total + part
        loss = total / len(self.pairs)
        zero = torch.zeros((), device=loss.device)
        return loss, {"kl": zero, "ce": zero, "hidden": zero, "act": loss.detach()}


def student_mixer_modules(student: nn.Module, placement: Placement) -> list[nn.Module]:
    """The mixer module each layer runs under `placement` (for the stage-1 activation loss)."""
    return [layer.mixers[m] for layer, m in zip(student.model.layers, placement)]
