"""Self-speculative decoding, batched: a fast preset of the same weights drafts, the target verifies.

A round, for all B rows at once (row b has committed L_b tokens, prompt included):

1. draft: one 2-token step reads the last two committed tokens, then k - 1 one-token steps; each
   proposes the next token (argmax, or a sample from the draft's distribution q);
2. verify: one (k+1)-token step of the target reads [last committed, d_1 .. d_k] and gives the
   target's distribution p after each of them;
3. accept (`accept_drafts`): row b keeps its first n_b drafts and one token of the target's
   (greedy: d_i is kept while it equals argmax p_i; sampling: the rejection step below), so rows
   advance by different amounts (ragged acceptance);
4. roll back both caches to what each row committed, without running any token again.

Cache convention: the target has read every committed token but the last, the draft every one but
the last two. So the round's steps have fixed shapes (2 and 1 draft tokens, k + 1 target tokens)
whatever each row accepted, and both caches roll back to the same history slot n_b + 1.

Rollback (why it is exact and costs no recomputation): every step runs on fixed-address caches
with one position per row (the static form of supernet/static_decode.py). FA writes position p
into slot p and masks slots after the query, so moving a row's position back is the whole
rollback; SWA keeps a ring of window + k + 1 slots with each slot's absolute position, so the
rejected tokens' keys never displace a key still in the window and are masked by position until
overwritten. GDN/KDA cannot be cut back, so during a step they keep the recurrent state and conv
tails after every fed token (the token loop computes them anyway: T state writes, no extra
arithmetic) and rollback gathers slot n_b + 1 per row. The alternatives cost more: snapshotting
and re-reading the accepted tokens is another forward per round; recomputing the states from the
kept inputs re-reads every state once more.

Rows that are done (max_new_tokens or end-of-sequence) stay in the batch, roll back to slot 0
(the state before the round) and do not move, so every step keeps one shape and one CUDA graph.

Sampling (`temperature > 0`): d_i ~ q_i is kept with probability min(1, p_i(d_i) / q_i(d_i));
at the first rejection the token is drawn from max(p_i - q_i, 0) (normalised), and after k
acceptances a bonus token is drawn from p_{k+1}. Each emitted token is then distributed exactly
as the target's own sample (the standard speculative-sampling argument), so sampling stays exact.

Numerics: verification runs k + 1 tokens in one forward, plain decoding one per forward; float32
results can differ in the last bits between those shapes, so "identical greedy output" holds
unless two logits tie to within rounding.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from supernet.cache import SupernetCache
from supernet.layout import Placement, PlacementLike
from supernet.static_decode import GraphedStep, static_rows


@dataclass
class SpecStats:
    """What a run of speculative decoding did; acceptance counts every drafted token of active rows."""

    rounds: int = 0
    row_rounds: int = 0  # sum over rounds of the rows still decoding
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0  # row-rounds that ended at a rejected draft (n < k)
    ragged_rounds: int = 0  # rounds in which active rows kept different numbers of drafts
    target_forwards: int = 0
    draft_forwards: int = 0
    prefill_seconds: float = 0.0  # both prefills and making the caches static
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    decode_seconds: float = 0.0  # every round, end to end (drafting, verification, commits)
    accepted_per_round: list[float] = field(default_factory=list)
    row_accepted: list[int] = field(default_factory=list)  # per row: drafts kept over the run
    row_rejections: list[int] = field(default_factory=list)  # per row: rounds that ended at a rejection
    row_rounds_needed: list[int] = field(default_factory=list)  # per row: rounds until it was done

    @property
    def row_alphas(self) -> list[float]:
        """Each row's per-token acceptance (as `per_token_acceptance`, row by row): rows differ, and
        the slowest sets the number of rounds (placement/speculative_cost.expected_rounds_of_rows)."""
        return [a / (a + r) if a + r else 0.0 for a, r in zip(self.row_accepted, self.row_rejections)]

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def per_token_acceptance(self) -> float:
        """alpha, the chance that a draft is kept given the ones before it were: accepted over
        accepted + rejections (the maximum-likelihood estimate when each draft is kept with one
        probability alpha; rounds that kept all k end without a rejection)."""
        seen = self.accepted + self.rejections
        return self.accepted / seen if seen else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens a row gains per round (accepted drafts + the target's token)."""
        return (self.accepted + self.row_rounds) / self.row_rounds if self.row_rounds else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
                "rejections": self.rejections, "ragged_rounds": self.ragged_rounds,
                "acceptance_rate": self.acceptance_rate,
                "per_token_acceptance": self.per_token_acceptance, "tokens_per_round": self.tokens_per_round,
                "target_forwards": self.target_forwards, "draft_forwards": self.draft_forwards,
                "prefill_seconds": self.prefill_seconds, "draft_seconds": self.draft_seconds,
                "verify_seconds": self.verify_seconds, "decode_seconds": self.decode_seconds,
                "row_alphas": self.row_alphas, "row_rounds_needed": self.row_rounds_needed}


# -- the acceptance rule ---------------------------------------------------------------------------
def probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


def pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """argmax (temperature 0) or a sample, per row of [..., V] logits."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = probabilities(logits, temperature)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def accept_drafts(drafts: torch.Tensor, draft_probs: torch.Tensor | None, target_logits: torch.Tensor,
                  temperature: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """How many drafts each row keeps, and the target's token after them.

    drafts [B, k]; draft_probs [B, k, V] (the q each draft was sampled from; None when greedy);
    target_logits [B, k + 1, V]. Returns (n [B] in 0..k, next token [B]).
    """
    b, k = drafts.shape
    rows = torch.arange(b, device=drafts.device)
    if temperature <= 0:
        choice = target_logits.argmax(-1)  # [B, k + 1]
        n = (drafts == choice[:, :k]).long().cumprod(1).sum(1)
        return n, choice[rows, n]
    p = probabilities(target_logits, temperature)  # [B, k + 1, V]
    p_d = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    q_d = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(b, k, device=drafts.device, generator=generator)
    n = (u * q_d < p_d).long().cumprod(1).sum(1)  # u < p/q without dividing by a zero q
    # the token after n kept drafts: residual max(p - q, 0) at a rejection, p itself after k kept
    q_pad = torch.cat([draft_probs, torch.zeros_like(p[:, :1])], dim=1)  # q_{k+1} = 0: the bonus draws from p
    residual = (p[rows, n] - q_pad[rows, n]).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p[rows, n])
    return n, torch.multinomial(residual, 1, generator=generator).squeeze(-1)


# -- one placement's fixed-address cache and its steps ---------------------------------------------
class _StaticRows:
    """A prefilled cache made fixed-size, and static steps of `t` tokens per row that keep history.

    `run(tokens, position, slot)` feeds tokens [B, t] at per-row positions [B]; the recurrent
    mixers record the state after each token at history slots slot .. slot + t - 1. Each step
    shape is one `GraphedStep` (a CUDA graph on CUDA, eager elsewhere).
    """

    def __init__(self, model, placement: Placement, cache: SupernetCache, *, capacity: int, lookahead: int,
                 history_slots: int, step_tokens: tuple[int, ...], cuda_graph: bool) -> None:
        self.model, self.placement, self.cache = model, placement, cache
        device = next(model.parameters()).device
        self.mixers = [(i, layer.mixers[m], m) for i, (layer, m) in enumerate(zip(model.model.layers, placement))]
        batch = None
        for i, module, m in self.mixers:
            state = cache.states[i].get(m)
            if not state:
                raise ValueError(f"the cache holds no {m!r} state for layer {i}: prefill with the same placement first")
            module.prepare_static(state, capacity, lookahead)
            module.prepare_history(state, history_slots)
            batch = next(v.shape[0] for v in state.values() if isinstance(v, torch.Tensor))
        vocab = model.config.vocab_size
        dtype = model.lm_head.weight.dtype
        self.position = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.inputs = {t: torch.zeros(batch, t, dtype=torch.long, device=device) for t in step_tokens}
        self.logits = {t: torch.zeros(batch, t, vocab, dtype=dtype, device=device) for t in step_tokens}
        mixers = [(i, m) for i, _, m in self.mixers]
        # One set of fixed state tensors for every step shape: a step that replaces a state (eagerly,
        # or while warming up before its capture) is copied back into it (`_pin`), so the graphs of
        # the other shapes, which read these very tensors, always see the current state.
        self.fixed = {(i, m, key): v for i, m in mixers for key, v in cache.states[i][m].items()
                      if isinstance(v, torch.Tensor)}
        self.steps = {t: GraphedStep(lambda t=t: self._body(t), cache, mixers, cuda_graph=cuda_graph) for t in step_tokens}

    def _body(self, t: int) -> None:
        with static_rows(self.cache, self.position, self.slot):
            pos_ids = self.position.view(-1, 1) + torch.arange(t, device=self.position.device)
            out = self.model(self.inputs[t], position_ids=pos_ids, past_key_values=self.cache, use_cache=True,
                             placement=self.placement).logits
            self.logits[t].copy_(out)

    def run(self, tokens: torch.Tensor, position: torch.Tensor, slot: int) -> torch.Tensor:
        """Logits [B, t, V] (a buffer, valid until the next step of this shape)."""
        t = tokens.shape[1]
        self.inputs[t].copy_(tokens)
        self.position.copy_(position)
        self.slot.fill_(slot)
        with torch.inference_mode():
            self.steps[t]()
            self._pin()
        return self.logits[t]

    def _pin(self) -> None:
        for (i, m, key), fixed in self.fixed.items():
            state = self.cache.states[i][m]
            if state[key] is not fixed:
                fixed.copy_(state[key])
                state[key] = fixed

    def rollback(self, index: torch.Tensor) -> None:
        """Row b returns to history slot index[b] (0: where the round began)."""
        with torch.inference_mode():  # the states were made by inference-mode steps
            for i, module, m in self.mixers:
                module.rollback(self.cache.states[i][m], index)


def check_draft_settings(config, draft: PlacementLike, target: PlacementLike, k: int) -> tuple[Placement, Placement]:
    """The resolved (draft, target) for a model `config`, or a ValueError naming the bad setting and the fix."""
    if k < 1:
        raise ValueError(f"draft tokens per round (k) must be >= 1, got {k}")
    d, t = config.resolve(draft), config.resolve(target)
    if tuple(d) == tuple(t):
        raise ValueError(f"the draft placement equals the target ({t.summary()}): drafting with the target "
                         "itself only adds work; pick a faster preset or drop --draft-preset")
    return d, t


@torch.no_grad()
def speculative_generate(
    model,
    input_ids: torch.Tensor,
    draft_placement: PlacementLike,
    target_placement: PlacementLike,
    k: int = 4,
    max_new_tokens: int = 64,
    eos_token_id: int | None = None,
    *,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    cuda_graph: bool | None = None,
    capture_first: bool | None = None,
) -> tuple[list[list[int]], SpecStats]:
    """Continue every row of input_ids [B, T] (T >= 2): the target's own greedy tokens (or samples).

    Returns (new tokens per row, each cut after its first `eos_token_id`; stats).
    `capture_first` (default: with CUDA graphs) runs every step shape's warm-up and capture before
    the decode timer starts (`_capture_steps`), so `stats.decode_seconds` is replay time.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"speculative decoding needs input_ids [B, T] with T >= 2, got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    draft, target = check_draft_settings(model.config, draft_placement, target_placement, k)
    device = input_ids.device
    cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    batch, prompt = input_ids.shape
    layers = model.config.num_hidden_layers
    stats = SpecStats()
    timer = _Timer(device)

    # prefill: the target reads the prompt and gives the first token; the draft reads all but its last token
    timer.start()
    t_cache, d_cache = SupernetCache(layers), SupernetCache(layers)
    first_logits = model(input_ids, past_key_values=t_cache, use_cache=True, placement=target, logits_to_keep=1).logits[:, -1]
    model(input_ids[:, :-1], past_key_values=d_cache, use_cache=True, placement=draft, logits_to_keep=1)
    first = pick(first_logits, temperature, generator)
    stats.target_forwards += 1
    stats.draft_forwards += 1
    capacity = prompt + max_new_tokens + 2 * (k + 1)
    shared = dict(capacity=capacity, lookahead=k + 1, history_slots=k + 2, cuda_graph=cuda_graph)
    verifier = _StaticRows(model, target, t_cache, step_tokens=(k + 1,), **shared)
    drafter = _StaticRows(model, draft, d_cache, step_tokens=(2, 1) if k > 1 else (2,), **shared)
    last_two = torch.stack([input_ids[:, -1], first], dim=1)
    length = torch.full((batch,), prompt + 1, dtype=torch.long, device=device)  # committed tokens per row
    if cuda_graph if capture_first is None else capture_first:
        _capture_steps(drafter, verifier, last_two, length, k)
    stats.prefill_seconds = timer.stop()
    decode = _Timer(device)
    decode.start()

    out: list[list[int]] = [[int(x)] for x in first.tolist()]
    stats.row_accepted, stats.row_rejections, stats.row_rounds_needed = [0] * batch, [0] * batch, [0] * batch
    done = torch.tensor([max_new_tokens <= 1 or int(x) == eos_token_id for x in first.tolist()], device=device)
    while not bool(done.all()):
        active = ~done
        # -- draft ------------------------------------------------------------------------------
        timer.start()
        drafts, draft_probs = [], []
        logits = drafter.run(last_two, length - 2, slot=1)[:, -1]
        for j in range(k):
            if j:
                logits = drafter.run(drafts[-1][:, None], length - 1 + j, slot=j + 2)[:, -1]
            drafts.append(pick(logits, temperature, generator))
            if temperature > 0:
                draft_probs.append(probabilities(logits, temperature))
        drafted = torch.stack(drafts, dim=1)  # [B, k]
        stats.draft_forwards += k
        stats.draft_seconds += timer.stop()
        # -- verify, accept, roll back ----------------------------------------------------------
        timer.start()
        v_logits = verifier.run(torch.cat([last_two[:, 1:], drafted], dim=1), length - 1, slot=1)
        n, token = accept_drafts(drafted, torch.stack(draft_probs, 1) if draft_probs else None, v_logits,
                                 temperature, generator)
        n = torch.where(active, n, 0)
        keep = torch.where(active, n + 1, 0)  # history slot of each row's last committed-but-one token
        verifier.rollback(keep)
        drafter.rollback(keep)
        stats.target_forwards += 1
        stats.verify_seconds += timer.stop()
        # -- commit -----------------------------------------------------------------------------
        before = torch.where(n > 0, drafted.gather(1, (n - 1).clamp_min(0)[:, None]).squeeze(1), last_two[:, 1])
        last_two = torch.where(active[:, None], torch.stack([before, token], dim=1), last_two)
        length = length + keep
        n_host, active_host = n.tolist(), active.tolist()
        drafted_host, token_host = drafted.tolist(), token.tolist()
        stats.rounds += 1
        stats.row_rounds += sum(active_host)
        stats.drafted += k * sum(active_host)
        stats.accepted += sum(n_host)
        stats.accepted_per_round.append(sum(n_host) / max(1, sum(active_host)))
        kept = [n_host[b] for b in range(batch) if active_host[b]]
        stats.rejections += sum(x < k for x in kept)
        stats.ragged_rounds += len(set(kept)) > 1
        finished = []
        for b in range(batch):
            if not active_host[b]:
                finished.append(True)
                continue
            stats.row_accepted[b] += n_host[b]
            stats.row_rejections[b] += n_host[b] < k
            stats.row_rounds_needed[b] += 1
            for tok in drafted_host[b][: n_host[b]] + [token_host[b]]:
                out[b].append(tok)
                if tok == eos_token_id or len(out[b]) >= max_new_tokens:
                    break
            finished.append(len(out[b]) >= max_new_tokens or out[b][-1] == eos_token_id)
        done = torch.tensor(finished, device=device)
    stats.decode_seconds = decode.stop()
    return out, stats


def _capture_steps(drafter: _StaticRows, verifier: _StaticRows, last_two: torch.Tensor, length: torch.Tensor,
                   k: int) -> None:
    """Warm up and capture every step shape's CUDA graph before decoding, so capture is not timed
    as decoding. The steps run the first round's own shapes and positions, then both caches roll
    back to history slot 0: recurrent states return exactly; attention keys written at positions
    not yet committed are masked until the real round overwrites them (positions are contiguous)."""
    batch = last_two.shape[0]
    zeros = torch.zeros(batch, dtype=torch.long, device=last_two.device)
    verify_in = torch.cat([last_two[:, 1:], last_two[:, 1:].expand(batch, k)], dim=1)
    for t, step in drafter.steps.items():
        for _ in range(step.warmup + 1):  # the eager warm-ups, then the capture
            if t == 2:
                drafter.run(last_two, length - 2, slot=1)
            else:
                drafter.run(last_two[:, 1:], length - 1, slot=2)
    for _ in range(verifier.steps[k + 1].warmup + 1):
        verifier.run(verify_in, length - 1, slot=1)
    drafter.rollback(zeros)
    verifier.rollback(zeros)


class _Timer:
    """Wall time of a phase, synchronising CUDA so the phase's kernels are counted in it."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.t0 = 0.0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - self.t0
