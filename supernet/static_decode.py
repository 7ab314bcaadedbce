"""Static decoding: fixed-address decode caches, so one decode step can be replayed as a CUDA graph.

Why: a 135M-parameter model at batch 64 launches several hundred small kernels per token. Launched one
by one from Python they take longer than the work itself, which hides exactly what a placement
changes: FA reading its whole KV cache, SWA its window, GDN/KDA a constant-size state. Captured once
and replayed, a step costs what its kernels cost, as in vLLM's decode path. On the CPU the same
static step runs eagerly, which is how the tests prove it equals ordinary cached decoding.

How: after an ordinary prefill, every mixer's state is made fixed-size (`prepare_static`: FA's buffer
grows once to the final length, zero-filled), and the step reads the token position from a device
tensor (`cache.static_position`), so no Python int picks a shape or an index. States that a mixer
replaces rather than updates in place (GDN/KDA's recurrent matrix and conv tails) are copied back
into their fixed tensors at the end of the captured step.

Speculative decoding (supernet/speculative.py) runs the same kind of step with several tokens and one
position per row (`static_rows`); greedy generation of every kind starts in supernet/generation.py.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Callable, Iterator

import torch

from supernet.cache import SupernetCache
from supernet.layout import PlacementLike

StateKey = tuple[int, str, str]  # (layer index, mixer name, state entry)


@contextlib.contextmanager
def static_position(cache: SupernetCache, position: torch.Tensor) -> Iterator[None]:
    """Inside, attention mixers write and attend by the [1] long device tensor `position`."""
    cache.static_position = position
    cache.forward_memo.clear()  # a memo made outside (or before) this step must not be replayed
    try:
        yield
    finally:
        cache.static_position = None


@contextlib.contextmanager
def static_rows(cache: SupernetCache, position: torch.Tensor, history_slot: torch.Tensor) -> Iterator[None]:
    """The speculative form: row b's tokens start at position[b] ([B] long), and recurrent mixers keep
    their state after every token from history slot `history_slot` ([1] long) on."""
    cache.history_slot = history_slot
    try:
        with static_position(cache, position):
            yield
    finally:
        cache.history_slot = None


class GraphedStep:
    """`fn()` mutates cache states in place; on CUDA it is captured once as a graph and replayed.

    `mixers` lists the (layer, mixer) states `fn` touches. The first `warmup` calls run eagerly on a
    side stream (Triton autotuning, cuBLAS workspaces and lazy allocations happen there, outside
    the capture); the next call captures and replays. With `cuda_graph=False` every call is eager.
    """

    def __init__(self, fn: Callable[[], None], cache: SupernetCache | None,
                 mixers: list[tuple[int, str]], *, cuda_graph: bool, warmup: int = 2,
                 capture_error_mode: str = "global") -> None:
        self.fn, self.cache, self.mixers = fn, cache, mixers
        self.cuda_graph, self.warmup = cuda_graph, warmup
        self.capture_error_mode = capture_error_mode
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0

    def _bound_states(self) -> dict[StateKey, torch.Tensor]:
        if self.cache is None:
            return {}
        return {
            (i, m, key): t
            for i, m in self.mixers
            for key, t in self.cache.states[i][m].items()
            if isinstance(t, torch.Tensor)
        }

    def _rebind(self, bound: dict[StateKey, torch.Tensor]) -> None:
        """Copy replaced state tensors back into the fixed ones the graph reads next time."""
        for (i, m, key), fixed in bound.items():
            state = self.cache.states[i][m]
            if state[key] is not fixed:
                fixed.copy_(state[key])
                state[key] = fixed
        if self.cache is not None and len(self._bound_states()) != len(bound):
            raise RuntimeError("a decode step created new cache state during capture; warm up longer")

    def __call__(self) -> None:
        self.calls += 1
        if not self.cuda_graph:
            self.fn()
            return
        if self.graph is not None:
            self.graph.replay()
            return
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.fn()
            torch.cuda.current_stream().wait_stream(side)
            return
        bound = self._bound_states()
        torch.cuda.synchronize()
        # A garbage collection inside the capture could destroy another decoder's graph or free its
        # memory, which invalidates the capture ("operation failed due to a previous error during
        # capture", seen when a finished decoder's reference cycle was collected mid-capture).
        gc.collect()
        gc.disable()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode=self.capture_error_mode):
                self.fn()
                self._rebind(bound)
        finally:
            gc.enable()
        self.graph = graph
        graph.replay()  # capturing records the step without running it


class StaticDecoder:
    """Greedy decoding of one placement from a prefilled cache, one token per `step()`.

    `start(token)` takes the first token to feed ([B, 1], usually the argmax of the prefill's last
    logits); each `step()` feeds it, and the argmax of the step's logits becomes the next input.
    Room is reserved for `max_new_tokens` steps. `finish()` hands the cache back for ordinary use.
    """

    def __init__(self, model, placement: PlacementLike, cache: SupernetCache, *, max_new_tokens: int,
                 cuda_graph: bool | None = None) -> None:
        self.model = model
        self.placement = model.config.resolve(placement)
        self.cache = cache
        self.device = next(model.parameters()).device
        self.base = cache.seen_tokens
        self.capacity = cache.seen_tokens + max_new_tokens
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        for i, (layer, mixer) in enumerate(zip(model.model.layers, self.placement)):
            state = cache.states[i].get(mixer)
            if not state:
                raise ValueError(
                    f"the cache holds no {mixer!r} state for layer {i}: prefill with the same placement first"
                )
            layer.mixers[mixer].prepare_static(state, self.capacity)
        self.position = torch.tensor([cache.seen_tokens], device=self.device)
        self.token: torch.Tensor | None = None
        self.steps = 0
        self._step = GraphedStep(self._body, cache, list(enumerate(self.placement)), cuda_graph=self.cuda_graph)

    def start(self, token: torch.Tensor) -> None:
        """Set the next input token, [B, 1] long."""
        if self.token is None:
            self.token = token.to(self.device, torch.long).clone()
        else:
            self.token.copy_(token)

    def _body(self) -> None:
        with static_position(self.cache, self.position):
            pos_ids = self.position.view(1, 1).expand(self.token.shape[0], 1)
            logits = self.model(self.token, position_ids=pos_ids, past_key_values=self.cache, use_cache=True,
                                placement=self.placement).logits
            self.token.copy_(logits[:, -1:].argmax(-1))
            self.position.add_(1)

    def step(self) -> torch.Tensor:
        """Decode one token for every row; returns the new tokens [B, 1] (a buffer: clone to keep)."""
        if self.token is None:
            raise RuntimeError("call start(token) before step()")
        if self.base + self.steps >= self.capacity:
            raise RuntimeError(f"the static cache is full ({self.capacity} tokens); make a new decoder")
        with torch.inference_mode():
            self._step()
        self.steps += 1
        self.cache.seen_tokens = self.base + self.steps
        return self.token

    def generate(self, first_token: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy tokens [B, new_tokens] after `first_token` (which is fed, not returned)."""
        self.start(first_token)
        return torch.cat([self.step().clone() for _ in range(new_tokens)], dim=1)

    def finish(self) -> SupernetCache:
        """Record the decoded length in the attention states so ordinary decoding can continue."""
        for i, mixer in enumerate(self.placement):
            state = self.cache.states[i][mixer]
            if "len" in state:
                state["len"] = self.cache.seen_tokens
        return self.cache
