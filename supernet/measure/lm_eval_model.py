"""Our model as an lm-evaluation-harness LM: log-likelihoods, rolling log-likelihoods and greedy generation
for any placement, so `lm_eval.simple_evaluate` scores presets like any other model.

Registered as lm-eval model `supernet` (model_args `pretrained=CKPT,placement=P|preset=NAME,batch_tokens=N`).

Batches are right-padded and run without an attention mask. That is exact for every mixer: all four are
causal, so the logits of a real token never see the padding after it (the model refuses a padding mask
because linear mixers could not honour a left-padded one). The same class wraps a plain HF causal LM
(`placement=None`), which is how the teacher can be scored by the very same code.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from supernet.cache import SupernetCache
from supernet.layout import Placement, PlacementLike


@register_model("supernet")
class SupernetLM(TemplateLM):
    """lm-eval LM over a SupernetForCausalLM at one placement (or over an HF causal LM when placement=None)."""

    def __init__(self, model: Any = None, tokenizer: Any = None, placement: PlacementLike | None = "all-fa",
                 batch_tokens: int = 4096, max_length: int | None = None, pretrained: str | None = None,
                 preset: str | None = None, device: str = "cpu", progress: bool = True, **_: Any) -> None:
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("SupernetLM needs a model or pretrained=CHECKPOINT")
            model, tokenizer = _load(pretrained, device)
            placement = preset or placement
        self.model, self.tokenizer = model.eval(), tokenizer
        self.is_supernet = placement is not None and hasattr(model.config, "resolve")
        self.placement: Placement | None = model.config.resolve(placement) if self.is_supernet else None
        self.batch_tokens = int(batch_tokens)
        self.max_length = int(max_length or getattr(model.config, "max_position_embeddings", 2048))
        self._device = next(model.parameters()).device
        self.progress = progress

    # -- tokens ---------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # As lm-eval's HF model: BOS when the tokenizer has one, else EOS, conditions an empty context.
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    # -- forward --------------------------------------------------------------------------------
    def _logits(self, ids: torch.Tensor, cache: SupernetCache | None = None) -> torch.Tensor:
        if self.is_supernet:
            return self.model(input_ids=ids, placement=self.placement, past_key_values=cache,
                              use_cache=cache is not None).logits
        return self.model(input_ids=ids, use_cache=False).logits

    def _hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Last hidden states: log-likelihoods need the vocabulary projection only at continuation tokens."""
        if self.is_supernet:
            return self.model.model(input_ids=ids, placement=self.placement, use_cache=False).last_hidden_state
        return self.model.model(input_ids=ids, use_cache=False).last_hidden_state

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests: Sequence[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **_: Any) -> list[tuple[float, bool]]:
        """(sum log p(continuation), continuation is the greedy one) per (key, context ids, continuation ids)."""
        items = []
        for k, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError("empty continuation in a log-likelihood request")
            whole = (context + continuation)[-(self.max_length + 1):]
            items.append((k, whole[:-1], whole[len(whole) - len(continuation):]))
        order = sorted(range(len(items)), key=lambda i: -len(items[i][1]))
        results: list[tuple[float, bool] | None] = [None] * len(items)
        bar = tqdm(total=len(items), desc="log-likelihoods", disable=disable_tqdm or not self.progress)
        start = 0
        while start < len(order):
            longest = len(items[order[start]][1])
            size = max(1, self.batch_tokens // longest)
            chunk = [items[i] for i in order[start:start + size]]
            batch = torch.full((len(chunk), longest), self.eot_token_id, dtype=torch.long)
            for row, (_, inp, _) in enumerate(chunk):
                batch[row, :len(inp)] = torch.tensor(inp)
            hidden = self._hidden(batch.to(self._device))
            head = self.model.get_output_embeddings()
            for row, (k, inp, cont) in enumerate(chunk):
                n = len(cont)
                lp = F.log_softmax(head(hidden[row, len(inp) - n:len(inp)]).float(), dim=-1)
                target = torch.tensor(cont, device=lp.device)
                total = float(lp.gather(-1, target[:, None]).sum())
                greedy = bool(torch.equal(lp.argmax(-1), target))
                results[k] = (total, greedy)
                self.cache_hook.add_partial("loglikelihood", requests[k][0], (total, greedy))
            del hidden
            start += len(chunk)
            bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood in disjoint windows of max_length tokens (each token scored once)."""
        out = []
        for req in tqdm(requests, desc="rolling log-likelihoods", disable=disable_tqdm or not self.progress):
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, 1)]
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows], disable_tqdm=True)
            total = sum(s for s, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    @torch.inference_mode()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, cut at the first stop string (lm-eval's `until`)."""
        out = []
        for req in tqdm(requests, desc="generating", disable=disable_tqdm or not self.progress):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") and float(kwargs.get("temperature", 1.0)) > 0:
                raise ValueError("SupernetLM generates greedily; set do_sample: false in the task's generation_kwargs")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            eos_text = self.tokenizer.decode([self.eot_token_id])
            max_new = int(kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
            text = self._greedy(ids, max_new, until + [eos_text])
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
            out.append(text)
        return out

    def _greedy(self, ids: list[int], max_new: int, stops: list[str]) -> str:
        cache = SupernetCache(self.model.config.num_hidden_layers) if self.is_supernet else None
        new: list[int] = []
        seq = torch.tensor([ids], device=self._device)
        text = ""
        for _ in range(max_new):
            if cache is not None:
                logits = self._logits(seq if not new else seq[:, -1:], cache)[0, -1]
            else:
                logits = self._logits(seq)[0, -1]
            token = int(logits.argmax())
            new.append(token)
            seq = torch.cat([seq, torch.tensor([[token]], device=self._device)], dim=1)
            text = self.tokenizer.decode(new)
            hits = [text.index(s) for s in stops if s and s in text]
            if hits:
                return text[:min(hits)]
        return text


def _load(pretrained: str, device: str):
    from supernet.cli.model_cmds import load_checkpoint

    return load_checkpoint(pretrained, device=device)
