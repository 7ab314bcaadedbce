"""vLLM general plugin (entry point `vllm.general_plugins: supernet = serving.plugin:register`).

vLLM calls `register()` in every process it starts (API server, engine core, workers) before it
reads the model config. We:

1. register `SupernetForCausalLM` (lazily, by import path) with vLLM's `ModelRegistry` and make
   `AutoConfig` know model_type "supernet";
2. add a config hook for the architecture (`MODELS_CONFIG_MAP`): it resolves `--hf-overrides`
   (`preset`, `placement`, `switchable`, `draft_preset`) into a serving plan, fails early with one
   line on a bad preset, tells vLLM which layers are linear (`layer_types`, so a preset without
   GDN/KDA is an ordinary attention model), turns prefix caching off in switchable mode (cached KV
   would depend on the preset; single-preset hybrids keep it through vLLM's mamba "align" mode),
   and installs the request router;
3. in the API server, map a request's model name `NAME:PRESET` to `extra_args["preset"]`;
4. declare the GDN/KDA core op (`vllm::supernet_linear_core`) a splitting op, as vLLM's own GDN
   ops are: piecewise CUDA graphs run it eagerly between pieces, full decode graphs capture it.
"""
from __future__ import annotations

import os

ARCHITECTURE = "SupernetForCausalLM"
MODEL_PATH = "supernet.serving.vllm_model:SupernetForCausalLM"
CORE_OP = "vllm::supernet_linear_core"  # registered by supernet.serving.linear_layers
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    import supernet.model  # noqa: F401  (registers the Auto classes for model_type "supernet")
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_PATH)
    MODELS_CONFIG_MAP[ARCHITECTURE] = _config_hook()
    _declare_splitting_op()
    _patch_request_model_names()


def _declare_splitting_op() -> None:
    """vLLM's default `splitting_ops` are its attention ops (`CompilationConfig._attention_ops`)."""
    from vllm.config import CompilationConfig

    if CORE_OP not in CompilationConfig._attention_ops:
        CompilationConfig._attention_ops.append(CORE_OP)


def _config_hook():
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    class SupernetConfigHook(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_model_config(model_config) -> None:
            from supernet.serving import routing
            from supernet.serving.plan import serving_plan

            hf_config = model_config.hf_config
            plan = serving_plan(hf_config)  # raises PlacementError (one line) on a bad preset
            # The router follows rows of the V1 runner's persistent batch (serving.routing); set
            # before vLLM picks a runner, inherited by the engine processes it starts.
            os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
            hf_config.layer_types = plan.layer_types()
            routing.remember_plan(str(model_config.model), plan)

        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            from supernet.serving import routing
            from supernet.serving.plan import check_tensor_parallel, serving_plan

            model_config = vllm_config.model_config
            plan = serving_plan(model_config.hf_config)
            spec = vllm_config.speculative_config
            if plan.switchable and vllm_config.use_v2_model_runner:
                raise ValueError("switchable serving needs vLLM's V1 model runner: unset VLLM_USE_V2_MODEL_RUNNER")
            if plan.switchable and spec is not None:
                raise ValueError(
                    "speculative decoding serves one target preset; drop switchable or the "
                    "speculative config"
                )
            has_linear = "linear_attention" in plan.layer_types()
            if vllm_config.cache_config.enable_prefix_caching and (plan.switchable or (has_linear and spec)):
                # switchable: cached KV of a preset is wrong for another (block hashes do not see
                # the preset); speculative: draft-verifying rows keep a page per draft token,
                # which align mode's block pages would have to mirror (not done)
                vllm_config.cache_config.enable_prefix_caching = False
            # A single-preset server with GDN/KDA keeps prefix caching: vLLM (HybridAttentionMamba
            # ModelConfig) then runs the state pages in mamba_cache_mode "align" (a state page per
            # block, prefill chunks ending on block boundaries, pages copied across boundaries
            # before the step), which the layers follow as they are: they read and write the page
            # the metadata names and treat has_initial_state as "continue from that page".
            tp = vllm_config.parallel_config.tensor_parallel_size
            check_tensor_parallel(model_config.hf_config, plan, tp)  # GDN/KDA heads split evenly
            if tp > 1 and plan.draft is not None:
                raise ValueError("self-speculative drafting (draft_preset) runs at tensor-parallel size 1; "
                                 "drop --tensor-parallel-size or the draft preset")
            splitting = vllm_config.compilation_config.splitting_ops
            if splitting and CORE_OP not in splitting:  # a user-given list: our op still splits
                splitting.append(CORE_OP)
            if spec is None:
                procs = list(model_config.logits_processors or [])
                if routing.ROUTER_FQCN not in procs and routing.PresetRouter not in procs:
                    model_config.logits_processors = procs + [routing.ROUTER_FQCN]

    return SupernetConfigHook


def _patch_request_model_names() -> None:
    """`model="supernet:fast"` -> SamplingParams.extra_args["preset"] = "fast" (API server side).

    vLLM accepts every name given to `--served-model-name` and answers an unknown one with 404;
    `supernet serve --switchable` lists `NAME:PRESET` for every preset."""
    try:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    except Exception:  # pragma: no cover - entrypoints not importable in this process
        return
    from supernet.serving.routing import PRESET_KEY, validate_preset

    for cls in (CompletionRequest, ChatCompletionRequest):
        original = cls.to_sampling_params
        if getattr(original, "_supernet_patched", False):
            continue

        def to_sampling_params(self, *args, __original=original, **kwargs):
            params = __original(self, *args, **kwargs)
            model = getattr(self, "model", None) or ""
            if ":" in model:
                extra = dict(params.extra_args or {})
                extra.setdefault(PRESET_KEY, model.rsplit(":", 1)[1])
                params.extra_args = extra
            validate_preset(params)  # ValueError -> HTTP 400, also when no router is installed
            return params

        to_sampling_params._supernet_patched = True
        cls.to_sampling_params = to_sampling_params
