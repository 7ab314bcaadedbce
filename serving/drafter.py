"""vLLM side of self-speculative decoding: a custom proposer that drafts with a fast preset, batched.

    --hf-overrides '{"preset": "quality", "draft_preset": "fast"}'
    --speculative-config '{"method": "custom_class", "model": "supernet.serving.drafter.SupernetDrafter",
                           "num_speculative_tokens": 4}'

vLLM runs the target preset (the served model) and verifies the drafts with its rejection
sampler, so the output is the target's own. The draft runs through the served model's own
modules — embeddings, norms, MLPs and the projections of every served mixer, including vLLM's
packed CPU GEMM weights — so no weight exists twice; mixers only the draft uses are loaded once
next to the served ones (`draft_mixers`).

Batching. Every step, all rows that draft run together: one two-token forward reads each row's
last two committed tokens and proposes d_1, then k - 1 one-token forwards propose d_2 .. d_k: k
draft forwards per step whatever the number of rows, with ragged acceptance across rows. This is
the reference engine's round (supernet/speculative.py) on vLLM's side: the draft cache of a row
has read every committed token but the last two, attention caches are fixed-address (FA by
position, SWA a position-tagged ring of window + k + 1 slots) and GDN/KDA keep their state after
every fed token (history slots), so taking back rejected drafts is a per-row gather, no token is
run twice. A row new to the drafter (or one vLLM did not let draft the whole round) is read once
by an ordinary prefill forward of its own.

Which cache is whose: vLLM's proposer API hands `propose` each row's token history, not request
ids, so a row continues a stored draft cache whose fed tokens agree with its history far enough
(`_assign`). A cache is a function of the tokens it read, so this is exact even when rows move or
two requests are identical. A cache no row continued waits IDLE_STEPS steps (a request that sat
out a step comes back to it), its slot given away first if one is needed, and is then dropped
(finished requests; a preempted one is re-read).

Memory. The draft caches live in one pool of fixed-size rows (`DraftPool`), one row per sequence
vLLM may run at once (`max_num_seqs`), each sized for `max_model_len + k` tokens, allocated in
`load_model`. vLLM calls `load_model` before it profiles memory, so on a GPU the pool is counted
with the weights and the KV cache is sized around it; a server never allocates draft memory
while serving. (vLLM's CPU backend sizes its KV cache from VLLM_CPU_KVCACHE_SPACE alone, so
there the pool is simply extra; its size is logged.) Why not pages of vLLM's KV-cache manager:
0.32's `draft_model` method (the one that shares the KV cache manager) loads the draft as a second
model and requires every draft layer to be an attention layer of one KV-cache group, so a draft
with GDN/KDA or with both FA and SWA is not possible; and a `custom_class` proposer is given no
block tables, state indices or request ids with which it could address pages of its own.

Not combined with switchable mode: vLLM 0.32 refuses custom logits processors under speculative
decoding ("Custom logits processors are not supported when speculative decoding is enabled"),
and switchable serving learns each row's preset from one (`routing.PresetRouter`); the proposer
API carries no per-request parameters either, so a drafter could not tell rows' presets apart.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from supernet.cache import SupernetCache
from supernet.layout import Placement
from supernet.mixers.registry import spec
from supernet.static_decode import static_rows

IDLE_STEPS = 4  # a cache no row continued is kept this many steps (its slot given away first if needed)
STATS_ENV = "SUPERNET_DRAFTER_STATS"  # a file: one JSON line per drafting step (tests count forwards)


# -- the draft's mixers on top of the served modules ---------------------------------------------
class _ServedAttention:
    """A served FA/SWA layer (vLLM projections and RoPE) on the drafter's own KV cache.

    Ordinary cached forwards (prefill) keep the reference mixer's growing/sliding buffers;
    `prepare_static` makes them fixed-address, after which steps run under `static_rows`."""

    def __init__(self, mixer, layer_idx: int, name: str, config) -> None:
        self.mixer, self.layer_idx, self.name = mixer, layer_idx, name
        self.window = spec(name).window(config)
        self.scale = mixer.head_dim**-0.5

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, cache: SupernetCache) -> torch.Tensor:
        from supernet.mixers.attention import _GrowingKV, _SlidingKV, static_rows_attention
        from supernet.ops.attention import causal_attention

        b, t, _ = x.shape
        d = self.mixer.head_dim
        q, k, v = self.mixer._qkv(positions.reshape(-1), x.reshape(b * t, -1))
        q, k, v = (y.reshape(b, t, -1, d).transpose(1, 2) for y in (q, k, v))
        state = cache.mixer_state(self.layer_idx, self.name)
        if cache.static_position is not None:
            out = static_rows_attention(q, k, v, state, cache, self.window, self.scale)
        else:
            if self.window is None:
                k, v = _GrowingKV.append(state, k, v)
            else:
                k, v = _SlidingKV.append(state, k, v, self.window)
            out = causal_attention(q, k, v, scale=self.scale, window=self.window)
        out, _ = self.mixer.o_proj(out.transpose(1, 2).reshape(b * t, -1))
        return out.view(b, t, -1)

    def prepare_static(self, state: dict, capacity: int, lookahead: int) -> None:
        from supernet.mixers.attention import AttentionMixer

        AttentionMixer.prepare_static(self, state, capacity, lookahead)  # reads only self.window

    def prepare_history(self, state: dict, slots: int) -> None:
        """Attention rolls back by position: nothing to keep."""

    def rollback(self, state: dict, index: torch.Tensor) -> None:
        """Nothing to undo in place."""


class _ServedLinear:
    """A served GDN/KDA layer (vLLM projections, our conv + delta rule) on the drafter's own state:
    `conv` [B, C, W-1] and `recurrent` [B, HV, K, V], plus their history under `static_rows`."""

    HISTORY = ("recurrent", "conv")

    def __init__(self, mixer, layer_idx: int, name: str) -> None:
        self.mixer, self.layer_idx, self.name = mixer, layer_idx, name

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, cache: SupernetCache) -> torch.Tensor:
        m = self.mixer
        b, t, _ = x.shape
        raw, g, beta, gate, activation = m._project(x.reshape(b * t, -1))
        raw, g, beta = (y.reshape(b, t, *y.shape[1:]) for y in (raw, g, beta))
        state = cache.mixer_state(self.layer_idx, self.name)
        slot = cache.history_slot
        if slot is None:
            o, state["conv"], state["recurrent"] = m._rule(raw, g, beta, state.get("conv"), state.get("recurrent"))
        else:  # keep the state after every token: history slots slot .. slot + t - 1
            outs = []
            for j in range(t):
                o_j, state["conv"], state["recurrent"] = m._rule(raw[:, j : j + 1], g[:, j : j + 1], beta[:, j : j + 1],
                                                                 state["conv"], state["recurrent"])
                for name in self.HISTORY:
                    state[f"hist_{name}"].index_copy_(1, slot + j, state[name][:, None])
                outs.append(o_j)
            o = torch.cat(outs, dim=1)
        o = o.reshape(b * t, *o.shape[2:]).to(x.dtype)
        return m._readout(o, gate, activation).view(b, t, -1)

    def prepare_static(self, state: dict, capacity: int, lookahead: int) -> None:
        """Fixed sizes already."""

    def prepare_history(self, state: dict, slots: int) -> None:
        from supernet.mixers.gdn import LinearMixerBase

        LinearMixerBase.prepare_history(self, state, slots)  # reads only self.HISTORY

    def rollback(self, state: dict, index: torch.Tensor) -> None:
        from supernet.mixers.gdn import LinearMixerBase

        LinearMixerBase.rollback(self, state, index)


class _Reference:
    """A mixer only the draft uses: the reference module itself (it knows static rows and history)."""

    def __init__(self, module, rotary, name: str) -> None:
        self.module, self.rotary, self.name = module, rotary, name

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, cache: SupernetCache) -> torch.Tensor:
        rope = self.rotary(x, positions) if spec(self.name).family == "attention" else None
        return self.module(x, rope, cache)

    def prepare_static(self, state: dict, capacity: int, lookahead: int) -> None:
        self.module.prepare_static(state, capacity, lookahead)

    def prepare_history(self, state: dict, slots: int) -> None:
        self.module.prepare_history(state, slots)

    def rollback(self, state: dict, index: torch.Tensor) -> None:
        self.module.rollback(state, index)


class ServedDraftModel:
    """Runs one placement through a served `SupernetForCausalLM` (vLLM) on rows of a SupernetCache."""

    def __init__(self, vllm_model, placement: Placement) -> None:
        from supernet.mixers.rotary import RotaryEmbedding
        from supernet.serving.vllm_model import SupernetAttention

        self.vllm_model = vllm_model
        self.config = vllm_model.config
        self.placement = placement
        family = getattr(self.config, "teacher_family", "llama")
        llama_like = {"norm_layout": "pre", "qk_norm": "none", "embed_scale": None, "sliding_rope_theta": None,
                      "query_pre_attn_scalar": None}
        if any(getattr(self.config, key, want) != want for key, want in llama_like.items()):
            raise ValueError(f"self-speculative drafting does not support {family} checkpoints yet (its layers differ "
                             "from Llama's); serve them without draft_preset")
        rotary = RotaryEmbedding(self.config)  # for draft-only reference attention mixers
        model = vllm_model.model
        self.mixers: list = []
        for i, m in enumerate(placement):
            layer = model.layers[i]
            if m in layer.mixers:
                served = layer.mixers[m]
                self.mixers.append(_ServedAttention(served, i, m, self.config) if isinstance(served, SupernetAttention)
                                   else _ServedLinear(served, i, m))
            elif f"{i}_{m}" in model.draft_mixers:
                self.mixers.append(_Reference(model.draft_mixers[f"{i}_{m}"], rotary, m))
            else:
                raise ValueError(f"layer {i}: mixer {m!r} of the draft was not loaded (set draft_preset in --hf-overrides)")

    @property
    def device(self) -> torch.device:
        return self.vllm_model.model.embed_tokens.weight.device

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: SupernetCache) -> torch.Tensor:
        """tokens, positions [B, T] -> logits of each row's last token [B, vocab]; reads and extends `cache`."""
        model = self.vllm_model.model
        b, t = tokens.shape
        hidden = model.embed_tokens(tokens.reshape(-1))
        residual = None
        for layer, mixer in zip(model.layers, self.mixers):
            if residual is None:
                residual = hidden
                x = layer.input_layernorm(hidden)
            else:
                x, residual = layer.input_layernorm(hidden, residual)
            out = mixer(x.view(b, t, -1), positions, cache).reshape(b * t, -1)
            x, residual = layer.post_attention_layernorm(out, residual)
            hidden = layer.mlp(x)
        hidden, _ = model.norm(hidden, residual)
        return self.vllm_model.compute_logits(hidden.view(b, t, -1)[:, -1].contiguous())

    def prefill(self, tokens: torch.Tensor, capacity: int, lookahead: int, history_slots: int) -> SupernetCache:
        """One row's cache after reading tokens [T] (T >= 1), made fixed-address with history slots."""
        cache = SupernetCache(len(self.mixers))
        self.forward(tokens[None], torch.arange(tokens.shape[0], device=tokens.device)[None], cache)
        self.make_static(cache, capacity, lookahead, history_slots)
        return cache

    def make_static(self, cache: SupernetCache, capacity: int, lookahead: int, history_slots: int) -> None:
        for i, mixer in enumerate(self.mixers):
            state = cache.mixer_state(i, self.placement[i])
            mixer.prepare_static(state, capacity, lookahead)
            mixer.prepare_history(state, history_slots)

    def rollback(self, cache: SupernetCache, index: torch.Tensor) -> None:
        for i, mixer in enumerate(self.mixers):
            mixer.rollback(cache.mixer_state(i, self.placement[i]), index)


# -- the pool of draft caches ----------------------------------------------------------------------
class DraftPool:
    """Every draft state tensor with one row per sequence slot, allocated once.

    `rows(slots)` is a SupernetCache over some slots: views of the pool when the slots are
    consecutive, gathered copies otherwise; `write_back` stores what a step changed."""

    def __init__(self, template: SupernetCache, size: int) -> None:
        self.size = size
        self.keys: list[tuple[int, str, str]] = []
        self.tensors: dict[tuple[int, str, str], torch.Tensor] = {}
        self.scalars: dict[tuple[int, str], dict] = {}
        for i, layer in enumerate(template.states):
            for m, state in layer.items():
                self.scalars[(i, m)] = {key: v for key, v in state.items() if not isinstance(v, torch.Tensor)}
                for key, v in state.items():
                    if isinstance(v, torch.Tensor):
                        self.keys.append((i, m, key))
                        self.tensors[(i, m, key)] = v.new_zeros(size, *v.shape[1:])
        self.num_layers = template.num_layers

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def reset(self, slot: int) -> None:
        for (i, m, key), t in self.tensors.items():
            t[slot].fill_(-1 if key == "slot_pos" else 0)  # SWA ring: -1 marks an empty slot

    def store(self, slot: int, cache: SupernetCache) -> None:
        """Put a one-row cache (same layout) into `slot`."""
        for i, m, key in self.keys:
            self.tensors[(i, m, key)][slot].copy_(cache.states[i][m][key][0])

    def rows(self, slots: list[int]) -> tuple[SupernetCache, torch.Tensor | None]:
        cache = SupernetCache(self.num_layers)
        first = slots[0]
        contiguous = slots == list(range(first, first + len(slots)))
        index = None if contiguous else torch.tensor(slots, device=next(iter(self.tensors.values())).device)
        for (i, m), scalars in self.scalars.items():
            cache.states[i][m] = dict(scalars)
        for i, m, key in self.keys:
            t = self.tensors[(i, m, key)]
            cache.states[i][m][key] = t[first : first + len(slots)] if index is None else t.index_select(0, index)
        return cache, index

    def write_back(self, cache: SupernetCache, slots: list[int], index: torch.Tensor | None) -> None:
        first = slots[0]
        for i, m, key in self.keys:
            t, new = self.tensors[(i, m, key)], cache.states[i][m][key]
            if index is not None:
                t.index_copy_(0, index, new)
            elif new.data_ptr() != t[first].data_ptr():  # the step replaced this tensor: copy it in
                t[first : first + len(slots)].copy_(new)


@dataclass
class _Record:
    """What a pool slot's cache holds: history slot j = after reading fed[:base + j]."""

    slot: int
    fed: np.ndarray  # committed tokens, then the drafts fed last round
    base: int  # tokens read before the last round (the history slot 0 state)
    idle: int = 0  # steps since a row last continued it


class SupernetDrafter:
    """vLLM `custom_class` proposer drafting with the checkpoint's `draft_preset`, all rows at once."""

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
        self.num_slots = vllm_config.scheduler_config.max_num_seqs
        self.capacity = self.max_model_len + self.k + 2  # positions up to max_model_len + k - 2 are written
        self.history_slots = self.k + 2  # before the round, after each of the 2 + (k - 1) fed tokens
        self.records: dict[int, _Record] = {}  # last step's row -> record
        self.runner: ServedDraftModel | None = None
        self.pool: DraftPool | None = None
        self.stats_path = os.environ.get(STATS_ENV)

    def load_model(self, target_model, *args, **kwargs) -> None:
        self.runner = ServedDraftModel(target_model, self.draft)
        device = self.runner.device
        with torch.inference_mode():
            template = self.runner.prefill(torch.zeros(1, dtype=torch.long, device=device), self.capacity,
                                           self.k + 1, self.history_slots)
        self.pool = DraftPool(template, self.num_slots)
        from vllm.logger import init_logger  # under "vllm.": vLLM configures only its own loggers

        log = init_logger("vllm.supernet.drafter")
        log.info("supernet drafter: draft caches for %d sequences x %d tokens, %.1f MiB, allocated at load",
                 self.num_slots, self.capacity, self.pool.nbytes / 2**20)

    # -- which cache continues each row ----------------------------------------------------------
    @staticmethod
    def _reach(record: _Record, history: np.ndarray) -> int:
        """How far (in tokens of `history`) the record's history slots reach; -1 if it is not this row's."""
        fed, base = record.fed, record.base
        if base > len(history) or not np.array_equal(fed[:base], history[:base]):
            return -1
        upto = min(len(fed), len(history))
        diff = np.flatnonzero(fed[base:upto] != history[base:upto])
        return base + (int(diff[0]) if diff.size else upto - base)

    def _assign(self, rows: list[int], histories: list[np.ndarray],
                free: dict[int, _Record]) -> list[tuple[_Record, int] | None]:
        """For each row, the stored cache that continues it to n - 2 read tokens and its history slot
        (None: read the row afresh); each cache continues one row.

        Identical requests have identical caches, so a row may continue any cache whose fed tokens
        agree with its history far enough. Rows are matched most advanced first, each to the valid
        cache that had read the most (then: the one its row index held last step): two identical
        requests a round apart then keep their own caches even after vLLM moved their rows."""
        out: list[tuple[_Record, int] | None] = [None] * len(rows)
        for i in sorted(range(len(rows)), key=lambda i: -len(histories[i])):
            row, history = rows[i], histories[i]
            want = len(history) - 2
            best, best_key = None, None
            for r, rec in free.items():
                key = (rec.base, r == row)
                if not rec.base <= want <= rec.base + self.history_slots - 1 or (best_key is not None and key <= best_key):
                    continue
                tail = slice(max(0, rec.base - 8), rec.base)  # a cheap look at the last committed tokens first
                if np.array_equal(rec.fed[tail], history[tail]) and self._reach(rec, history) >= want:
                    best, best_key = r, key
            if best is not None:
                rec = free.pop(best)
                out[i] = (rec, want - rec.base)
        return out

    @torch.no_grad()
    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None, **kwargs):
        runner, pool, k = self.runner, self.pool, self.k
        device = runner.device
        free = dict(self.records)
        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        rows, histories, rooms = [], [], []
        for row, sampled in enumerate(sampled_token_ids):
            n = int(num_tokens_no_spec[row])
            room = min(k, self.max_model_len - n - 1)
            if not sampled or room <= 0:
                continue
            history = np.asarray(token_ids_cpu[row, :n], dtype=np.int64)
            rows.append(row)
            histories.append(history)
            rooms.append(room)
        plan = self._assign(rows, histories, free)
        # Caches nobody continued (a request that finished, was preempted, or sat out this step) wait
        # IDLE_STEPS steps in case their request comes back, unless their slot is needed first.
        waiting = {key: rec for key, rec in free.items() if rec.idle < IDLE_STEPS}
        taken = {found[0].slot for found in plan if found is not None}
        spare = sorted(set(range(pool.size)) - taken - {rec.slot for rec in waiting.values()})
        prefills = 0
        slots, index = [], []
        for history, found in zip(histories, plan):
            if found is not None:
                slots.append(found[0].slot)
                index.append(found[1])
                continue
            if not spare:  # evict the longest-waiting cache
                key = max(waiting, key=lambda key: waiting[key].idle)
                spare.append(waiting.pop(key).slot)
            slot = spare.pop(0)
            if len(history) > 2:  # a new row: read all of it but the last two tokens
                cache = runner.prefill(torch.as_tensor(history[:-2], device=device), self.capacity, k + 1,
                                       self.history_slots)
                pool.store(slot, cache)  # every tensor of the slot, so nothing of its last user is left
                prefills += 1
            else:
                pool.reset(slot)  # nothing read yet
            slots.append(slot)
            index.append(0)
        # waiting caches are kept under keys no row index takes (-1 - slot)
        self.records = {-1 - rec.slot: _Record(rec.slot, rec.fed, rec.base, rec.idle + 1) for rec in waiting.values()}
        if rows:
            proposals = self._draft(slots, histories, index)
            for row, history, slot, room, proposal in zip(rows, histories, slots, rooms, proposals):
                drafts[row] = proposal[:room]
                fed = np.concatenate([history, np.asarray(proposal[: k - 1], dtype=np.int64)])
                self.records[row] = _Record(slot, fed, len(history) - 2)
        if self.stats_path:
            with open(self.stats_path, "a") as f:
                # history slot each continued cache resumed from: 1 + the drafts its row kept (0: the cache
                # of an identical request that was one round ahead, e.g. one that finished)
                resumed = [i for i, found in zip(index, plan) if found is not None]
                f.write(json.dumps({"rows": len(rows), "draft_forwards": k if rows else 0, "prefills": prefills,
                                    "history_slots": resumed, "slots": slots}) + "\n")
        return drafts

    def _draft(self, slots: list[int], histories: list[np.ndarray], index: list[int]) -> list[list[int]]:
        """k batched forwards over all drafting rows: roll back, read the last two committed
        tokens (proposing d_1), then feed d_1 .. d_{k-1}."""
        runner, pool, k = self.runner, self.pool, self.k
        device = runner.device
        cache, gather = pool.rows(slots)
        runner.rollback(cache, torch.tensor(index, dtype=torch.long, device=device))
        length = torch.tensor([len(h) for h in histories], dtype=torch.long, device=device)
        last_two = torch.tensor(np.stack([h[-2:] for h in histories]), dtype=torch.long, device=device)
        steps = torch.arange(2, device=device)
        with static_rows(cache, length - 2, torch.ones(1, dtype=torch.long, device=device)):
            logits = runner.forward(last_two, (length - 2)[:, None] + steps, cache)
        proposal = [logits.argmax(-1)]
        for j in range(1, k):
            position = length - 1 + j
            with static_rows(cache, position, torch.full((1,), j + 2, dtype=torch.long, device=device)):
                logits = runner.forward(proposal[-1][:, None], position[:, None], cache)
            proposal.append(logits.argmax(-1))
        pool.write_back(cache, slots, gather)
        return torch.stack(proposal, dim=1).tolist()
