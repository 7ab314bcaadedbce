"""vLLM side of self-speculative decoding: a custom proposer that drafts with a fast preset.

    --hf-overrides '{"preset": "quality", "draft_preset": "fast"}'
    --speculative-config '{"method": "custom_class", "model": "supernet.serving.drafter.SupernetDrafter",
                           "num_speculative_tokens": 4}'

vLLM runs the target preset (the served model) and verifies the drafts with its rejection
sampler, so the output is the target's own. Why a custom proposer and not vLLM's `draft_model`
method: that one loads the draft as a second model (a second copy of every shared weight, plus its
own KV cache) and has no way to roll back recurrent draft states. Ours drafts with the served
model's own modules — embeddings, norms, MLPs and the projections of every served mixer, including
vLLM's packed CPU GEMM weights — so nothing is copied; mixers that only the draft uses are loaded
once next to the served ones (`draft_mixers`). The drafter keeps its own small per-sequence
caches (`SupernetCache`, KV for FA/SWA, conv tail + matrix for GDN/KDA) outside vLLM's pages.

vLLM hands `propose` each row's token history, not request ids, so draft caches are found by
content: a row continues the stored cache whose tokens are the longest prefix of its history. A
cache is a function of the tokens it read, so this is exact even when rows move or two requests
are identical; caches not continued in a step are dropped (finished or preempted requests; a
preempted one is re-read from its history). Drafting is greedy and sequential per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from supernet.serving.speculative import restore, snapshot
from supernet.cache import SupernetCache
from supernet.layout import Placement


class ServedDraftModel:
    """Runs one placement through a served `SupernetForCausalLM` (vLLM) with private caches."""

    def __init__(self, vllm_model, placement: Placement) -> None:
        from supernet.mixers.rotary import RotaryEmbedding

        self.vllm_model = vllm_model
        self.config = vllm_model.config
        self.placement = placement
        family = getattr(self.config, "teacher_family", "llama")
        llama_like = {"norm_layout": "pre", "qk_norm": "none", "embed_scale": None, "sliding_rope_theta": None,
                      "query_pre_attn_scalar": None}
        if any(getattr(self.config, key, want) != want for key, want in llama_like.items()):
            raise ValueError(f"self-speculative drafting does not support {family} checkpoints yet (its layers differ "
                             "from Llama's); serve them without draft_preset")
        self.rotary = RotaryEmbedding(self.config)  # for draft-only reference attention mixers
        for i, m in enumerate(placement):
            layer = vllm_model.model.layers[i]
            if m not in layer.mixers and f"{i}_{m}" not in vllm_model.model.draft_mixers:
                raise ValueError(f"layer {i}: mixer {m!r} of the draft was not loaded (set draft_preset in --hf-overrides)")

    def _attention(self, mixer, layer_idx: int, name: str, x, positions, cache: SupernetCache):
        from supernet.mixers.attention import _GrowingKV, _SlidingKV
        from supernet.ops.attention import causal_attention

        t = x.shape[0]
        qkv, _ = mixer.qkv_proj(x)
        q, k, v = qkv.split([mixer.q_size, mixer.kv_size, mixer.kv_size], dim=-1)
        q, k = mixer.rotary_emb(positions, q, k)
        d = mixer.head_dim
        q = q.reshape(1, t, -1, d).transpose(1, 2)
        k = k.reshape(1, t, -1, d).transpose(1, 2)
        v = v.reshape(1, t, -1, d).transpose(1, 2)
        state = cache.mixer_state(layer_idx, name)
        window = self.config.swa_window if name == "swa" else None
        if window is None:
            k, v = _GrowingKV.append(state, k, v)
        else:
            k, v = _SlidingKV.append(state, k, v, window)
        out = causal_attention(q, k, v, scale=d**-0.5, window=window)
        out, _ = mixer.o_proj(out.transpose(1, 2).reshape(t, -1))
        return out

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, cache: SupernetCache) -> torch.Tensor:
        """input_ids [T] -> logits [T, vocab]; reads and extends `cache`."""
        from supernet.serving.vllm_model import SupernetAttention

        model = self.vllm_model.model
        t = input_ids.shape[0]
        positions = torch.arange(cache.seen_tokens, cache.seen_tokens + t, device=input_ids.device)
        hidden = model.embed_tokens(input_ids)
        residual = None
        for i, layer in enumerate(model.layers):
            name = self.placement[i]
            if residual is None:
                residual = hidden
                x = layer.input_layernorm(hidden)
            else:
                x, residual = layer.input_layernorm(hidden, residual)
            mixer = layer.mixers[name] if name in layer.mixers else None
            if isinstance(mixer, SupernetAttention):
                out = self._attention(mixer, i, name, x, positions, cache)
            elif mixer is not None:
                out = mixer.forward_with_state(x, cache.mixer_state(i, name))
            else:  # a reference mixer only the draft uses
                ref = model.draft_mixers[f"{i}_{name}"]
                rope = self.rotary(x[None], positions[None]) if name in ("fa", "swa") else None
                out = ref(x[None], rope, cache)[0]
            x, residual = layer.post_attention_layernorm(out, residual)
            hidden = layer.mlp(x)
        hidden, _ = model.norm(hidden, residual)
        cache.advance(t)
        return self.vllm_model.compute_logits(hidden)


@dataclass
class _DraftState:
    consumed: np.ndarray  # the tokens this cache has read (all committed)
    cache: SupernetCache


class SupernetDrafter:
    """vLLM `custom_class` proposer drafting with the checkpoint's `draft_preset`."""

    def __init__(self, vllm_config) -> None:
        from supernet.serving.plan import serving_plan

        self.config = vllm_config.model_config.hf_config
        plan = serving_plan(self.config)
        if plan.draft is None:
            raise ValueError("self-speculative decoding needs a draft preset: --hf-overrides '{\"draft_preset\": \"NAME\"}'")
        if vllm_config.parallel_config.tensor_parallel_size != 1:
            raise ValueError("the supernet drafter runs the served modules on one rank: use tensor_parallel_size 1")
        self.draft = plan.draft
        self.k = vllm_config.speculative_config.num_speculative_tokens
        self.max_model_len = vllm_config.model_config.max_model_len
        self.states: list[_DraftState] = []
        self.runner: ServedDraftModel | None = None

    def load_model(self, target_model, *args, **kwargs) -> None:
        self.runner = ServedDraftModel(target_model, self.draft)

    def _match(self, history: np.ndarray, taken: set[int]) -> _DraftState | None:
        best, best_len = None, -1
        for idx, st in enumerate(self.states):
            m = len(st.consumed)
            if idx in taken or m >= len(history) or m <= best_len:
                continue
            if np.array_equal(st.consumed, history[:m]):
                best, best_len = idx, m
        if best is None:
            return None
        taken.add(best)
        return self.states[best]

    @torch.no_grad()
    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None, **kwargs):
        device = self.runner.vllm_model.model.embed_tokens.weight.device
        drafts: list[list[int]] = []
        taken: set[int] = set()
        kept: list[_DraftState] = []
        for row, sampled in enumerate(sampled_token_ids):
            n = int(num_tokens_no_spec[row])
            room = min(self.k, self.max_model_len - n - 1)
            if not sampled or room <= 0:
                drafts.append([])
                continue
            history = np.asarray(token_ids_cpu[row, :n], dtype=np.int64)
            state = self._match(history, taken)
            if state is None:
                state = _DraftState(history[:0].copy(), SupernetCache(self.config.num_hidden_layers))
            feed = torch.as_tensor(history[len(state.consumed) :], device=device)
            logits = self.runner(feed, state.cache)[-1]
            state.consumed = history.copy()
            snap = snapshot(state.cache)
            proposal = [int(logits.argmax())]
            for _ in range(room - 1):
                logits = self.runner(torch.tensor([proposal[-1]], device=device), state.cache)[-1]
                proposal.append(int(logits.argmax()))
            restore(state.cache, snap)
            kept.append(state)
            drafts.append(proposal)
        self.states = kept
        return drafts
