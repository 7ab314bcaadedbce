"""vLLM on a GPU: our plugin against vLLM's own Llama on the same teacher, every preset, a switchable
engine under mixed load, self-speculative decoding, and greedy agreement with our reference engine.

Each measurement runs one vLLM engine (vLLM's offline `LLM`, its defaults: torch.compile and CUDA
graphs; the switchable engine runs eagerly, as `supernet serve --switchable` does) in a child
process of its own, so that one engine's failure or memory does not touch the next, and writes one
JSON per job into --work; a rerun skips the jobs already done (resume across device calls). Decode
throughput is counted in the steady state: from the step at which every request of the batch has
its first token until the step before the first one finishes, tokens over wall time, read off
`LLMEngine.step()`.

    python benchmarks/bench_vllm_gpu.py --parts reference,llama,presets,switchable,speculative,compare \
        --context 8192 --batch 64 --out benchmarks/results/vllm_gpu_h200.json
    python benchmarks/bench_vllm_gpu.py --device cpu --dtype float32 --context 128 --batch 2 \
        --spec-batches 2 --presets all-fa,speedup-2x --switch-presets all-fa,speedup-2x   # a smoke run here

The model: SmolLM2-135M-Instruct converted to a supernet (linear mixers initialised from attention,
not trained: speeds and greedy agreement are meaningful, qualities are not), with all-fa and the
presets of benchmarks/results/e2e_presets.json (the first e2e run's placements).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

E2E_PRESETS = ROOT / "benchmarks" / "results" / "e2e_presets.json"
PARTS = ("reference", "llama", "presets", "switchable", "speculative", "compare")


# -- the model and the prompts ----------------------------------------------------------------------
def e2e_presets() -> dict[str, list[str]]:
    """all-fa plus the first e2e run's presets, as layer lists."""
    data = json.loads(E2E_PRESETS.read_text())
    presets = {"all-fa": ["fa"] * data["num_layers"]}
    for p in data["presets"]:
        presets[p["name"]] = list(p["placement"])
    return presets


def prepare_checkpoints(work: Path, swa_window: int, only: list[str] | None) -> tuple[Path, Path]:
    """(the teacher as an HF Llama folder, the converted supernet with the presets)."""
    from supernet.convert import convert_teacher
    from supernet.teacher import smollm2_hf_dir

    teacher = smollm2_hf_dir()
    ckpt = work / "supernet"
    if not (ckpt / "config.json").exists():
        print(f"converting {teacher} into {ckpt} ...", flush=True)
        convert_teacher(str(teacher), ckpt, swa_window=swa_window)
    config = json.loads((ckpt / "config.json").read_text())
    presets = {n: p for n, p in e2e_presets().items() if only is None or n in only}
    config["presets"] = presets
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
    return teacher, ckpt


def prompts_of(tokenizer_dir: Path, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens of the held-out corpus: windows at n evenly spaced offsets of its
    token stream, wrapping around (64 x 8192 tokens is more than the file holds; prefix caching is
    off in every engine, so overlapping windows cost the same as distinct text)."""
    from transformers import AutoTokenizer

    from benchmarks.bench_serving import DATA

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids: list[int] = []
    for line in DATA.open():
        ids += tok(json.loads(line)["text"])["input_ids"]
    stride = max(1, len(ids) // n)
    ring = ids + ids[: length]
    while len(ring) < (n - 1) * stride + length:
        ring += ids
    return [ring[i * stride : i * stride + length] for i in range(n)]


# -- one engine, in a child process -------------------------------------------------------------------
def steady_decode_rate(llm, prompts: list[list[int]], new_tokens: int, presets: list[str | None] | None = None) -> dict:
    """Decode tokens/s of `prompts` decoding together, in the steady state (see the module doc)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    presets = presets or [None] * len(prompts)
    t_submit = time.perf_counter()
    for i, (p, preset) in enumerate(zip(prompts, presets)):
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True,
                                extra_args={"preset": preset} if preset else None)
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", TokensPrompt(prompt_token_ids=p), params)
    counts: dict[str, int] = {}
    finished = 0
    start = last = None
    steps = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            counts[o.request_id] = len(o.outputs[0].token_ids)
            finished += bool(o.finished)
        if finished:
            continue
        total = sum(counts.values())
        if start is None and len(counts) == len(prompts) and min(counts.values()) >= 1:
            start = (now, total)
        elif start is not None:
            last = (now, total)
            steps += 1
    if start is None or last is None or last[0] <= start[0]:
        raise RuntimeError("no steady decoding window; raise --decode-tokens")
    return {"decode_tokens_per_s": (last[1] - start[1]) / (last[0] - start[0]), "window_s": last[0] - start[0],
            "tokens_in_window": last[1] - start[1], "steps_in_window": steps,
            "prefill_s": start[0] - t_submit, "batch": len(prompts)}


def greedy_tokens(llm, prompts: list[list[int]], new_tokens: int, preset: str | None = None) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True,
                            extra_args={"preset": preset} if preset else None)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def spec_counters(llm) -> tuple[float, float]:
    """(draft tokens, accepted tokens) so far, from vLLM's metrics."""
    drafted = accepted = 0.0
    for m in llm.get_metrics():
        name = m.name.removesuffix("_total")
        if name == "vllm:spec_decode_num_draft_tokens":
            drafted += m.value
        elif name == "vllm:spec_decode_num_accepted_tokens":
            accepted += m.value
    return drafted, accepted


def run_engine_job(job: dict) -> dict:
    """Child process: build the engine of `job`, measure, return the result."""
    from vllm import LLM

    kwargs = dict(model=job["model"], dtype=job["dtype"], max_model_len=job["max_model_len"],
                  max_num_seqs=job["max_num_seqs"], enable_prefix_caching=False, seed=0,
                  gpu_memory_utilization=job.get("gpu_memory_utilization", 0.85))
    if job.get("hf_overrides"):
        kwargs["hf_overrides"] = job["hf_overrides"]
    if job.get("speculative_config"):
        kwargs["speculative_config"] = job["speculative_config"]
    if job.get("enforce_eager"):
        kwargs["enforce_eager"] = True
    if job.get("log_stats"):
        kwargs["disable_log_stats"] = False
    if job.get("device") == "cpu":
        kwargs.pop("gpu_memory_utilization")
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    result: dict = {"engine_start_s": time.perf_counter() - t0}
    prompts = job["prompts"]
    check = job["check_prompts"]
    if job.get("log_stats"):
        spec_counters(llm)
    greedy_tokens(llm, [p[:64] for p in check[:2]], 4)  # warm-up
    if job["kind"] == "switchable":
        result["greedy"] = {p: greedy_tokens(llm, check, job["check_tokens"], p) for p in job["presets"]}
        single = {}
        n = job["batch"]
        for p in job["presets"]:
            single[p] = steady_decode_rate(llm, prompts[:n], job["decode_tokens"], [p] * n)
            print(f"[switchable] batch of {p}: {single[p]['decode_tokens_per_s']:.0f} tok/s", flush=True)
        routes = [job["presets"][i % len(job["presets"])] for i in range(n)]
        mixed = steady_decode_rate(llm, prompts[:n], job["decode_tokens"], routes)
        shares = {p: routes.count(p) / n for p in job["presets"]}
        weighted = sum(shares[p] * n / single[p]["decode_tokens_per_s"] for p in job["presets"])
        mixed_step = n / mixed["decode_tokens_per_s"]
        result.update(single_preset=single, mixed=mixed, shares=shares, mixed_step_s=mixed_step,
                      token_weighted_step_s=weighted, mixed_over_weighted=mixed_step / weighted)
        print(f"[switchable] mixed: {mixed_step / weighted:.3f}x the token-weighted single-preset step", flush=True)
        return result
    result["greedy"] = greedy_tokens(llm, check, job["check_tokens"])
    result["rates"] = {}
    for b in job["batches"]:
        d0, a0 = spec_counters(llm) if job.get("log_stats") else (0.0, 0.0)
        rate = steady_decode_rate(llm, prompts[:b], job["decode_tokens"])
        if job.get("log_stats"):
            d1, a1 = spec_counters(llm)
            rate.update(drafted=d1 - d0, accepted=a1 - a0, acceptance_rate=(a1 - a0) / (d1 - d0) if d1 > d0 else None)
        result["rates"][str(b)] = rate
        print(f"[{job['name']}] batch {b}: {rate['decode_tokens_per_s']:.0f} tok/s", flush=True)
    return result


def reference_job(job: dict) -> dict:
    """Our own engine (bf16, CUDA graphs): greedy tokens per preset on the check prompts."""
    import torch

    from supernet.generation import greedy_generate
    from supernet.model import SupernetForCausalLM

    device = torch.device(job["device"])
    dtype = getattr(torch, job["dtype"])
    model = SupernetForCausalLM.from_pretrained(job["model"], dtype=dtype).to(device).eval()
    ids = torch.tensor(job["check_prompts"], device=device)
    out = {}
    for preset in job["presets"]:
        out[preset] = greedy_generate(model, ids, preset, job["check_tokens"])
        print(f"[reference] {preset}: done", flush=True)
    return {"greedy": out}


def compare_job(job: dict) -> dict:
    """First token where vLLM's greedy output parts from ours, per preset and prompt, with our
    model's logit margin there between its own choice and vLLM's (a near-tie explains a parting)."""
    import torch

    from supernet.model import SupernetForCausalLM

    device = torch.device(job["device"])
    dtype = getattr(torch, job["dtype"])
    model = SupernetForCausalLM.from_pretrained(job["model"], dtype=dtype).to(device).eval()
    report = {}
    for preset, (ours, theirs) in job["pairs"].items():
        rows = []
        for prompt, a, b in zip(job["check_prompts"], ours, theirs):
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            row = {"first_difference": first, "equal": first is None and len(a) == len(b)}
            if first is not None:
                ids = torch.tensor([prompt + a[:first]], device=device)
                with torch.no_grad():
                    placement = model.config.resolve(preset.removeprefix("switchable:"))
                    logits = model(ids, placement=placement, logits_to_keep=1).logits[0, -1].float()
                row["our_margin"] = float(logits[a[first]] - logits[b[first]])
                row["our_top_gap"] = float(logits.topk(2).values.diff().abs())
            rows.append(row)
        report[preset] = rows
    return report


def child_main(job_file: Path) -> None:
    job = json.loads(job_file.read_text())
    fn = {"reference": reference_job, "compare": compare_job}.get(job["kind"], run_engine_job)
    result = fn(job)
    out = Path(job["result"])
    out.with_suffix(".tmp").write_text(json.dumps(result))
    os.replace(out.with_suffix(".tmp"), out)


# -- the parent: jobs in order, resumable -------------------------------------------------------------
def concurrency_from_log(text: str) -> dict:
    m = re.search(r"KV cache size: ([\d,]+) tokens", text)
    c = re.search(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x", text)
    out = {}
    if m:
        out["kv_cache_tokens"] = int(m.group(1).replace(",", ""))
    if c:
        out.update(at_tokens_per_request=int(c.group(1).replace(",", "")), max_concurrency=float(c.group(2)))
    return out


def run_job(work: Path, job: dict, deadline: float, est_s: float) -> dict | None:
    result = work / f"{job['name']}.json"
    if result.exists():
        return json.loads(result.read_text())
    if time.time() + est_s > deadline:
        print(f"[skip] {job['name']}: not enough time left in this call ({est_s:.0f} s needed)", flush=True)
        return None
    (work / f"{job['name']}.failed").unlink(missing_ok=True)
    job = {**job, "result": str(result)}
    spec = work / f"{job['name']}.job"
    spec.write_text(json.dumps(job))
    log = work / f"{job['name']}.log"
    print(f"[run] {job['name']} ...", flush=True)
    t0 = time.time()
    with open(log, "w") as fh:
        code = subprocess.call([sys.executable, str(Path(__file__).resolve()), "--job", str(spec)], cwd=ROOT,
                               stdout=fh, stderr=subprocess.STDOUT, timeout=max(60.0, deadline - time.time()))
    text = log.read_text(errors="replace")
    if code != 0 or not result.exists():
        tail = "\n".join(text.splitlines()[-25:])
        print(f"[fail] {job['name']} (exit {code}, {time.time() - t0:.0f} s):\n{tail}", flush=True)
        (work / f"{job['name']}.failed").write_text(tail)
        return None
    data = json.loads(result.read_text())
    data.update(concurrency_from_log(text))
    data["job_wall_s"] = time.time() - t0
    result.write_text(json.dumps(data))
    print(f"[done] {job['name']} in {data['job_wall_s']:.0f} s", flush=True)
    return data


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--spec-batches", default="8,64")
    p.add_argument("--decode-tokens", type=int, default=96)
    p.add_argument("--check-prompts", type=int, default=8, help="greedy checks run these as one batch")
    p.add_argument("--presets", default=None, help="comma-separated subset of the presets (default: all)")
    p.add_argument("--check-tokens", type=int, default=32)
    p.add_argument("--swa-window", type=int, default=512)
    p.add_argument("--draft", default="speedup-2x")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--switch-presets", default="all-fa,speedup-2x,speedup-4x,speedup-4.48x")
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting engines after this many seconds")
    p.add_argument("--engine-estimate-s", type=float, default=75.0)
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "bench-vllm-gpu")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.job:
        return child_main(args.job)
    deadline = time.time() + args.budget_s
    args.work.mkdir(parents=True, exist_ok=True)
    # our switchable router needs vLLM's V1 model runner (see supernet.serving.routing); every engine
    # of the run uses the same one, vLLM's Llama included
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    # the carried vLLM has no FlashInfer (benchmarks/gpu/vllm_bundle.sh): PyTorch's top-k/top-p sampler
    os.environ["VLLM_USE_FLASHINFER_SAMPLER"] = "0"
    if args.device == "cpu":
        from supernet.serving.server import cpu_env

        os.environ.update(cpu_env(args.work / "vllm-cpu"))
    teacher, ckpt = prepare_checkpoints(args.work, args.swa_window, args.presets.split(",") if args.presets else None)
    presets = list(json.loads((ckpt / "config.json").read_text())["presets"])
    spec_batches = [int(b) for b in args.spec_batches.split(",")]
    n = max([args.batch] + spec_batches)
    prompts = prompts_of(ckpt, n, args.context - args.decode_tokens)
    check = [q[:256] for q in prompts_of(ckpt, args.check_prompts, 256 + 1)]
    # sequences end at --context (prompt + decoded tokens): SmolLM2's positions stop at 8192
    base = dict(dtype=args.dtype, device=args.device, max_model_len=max(args.context, 256 + args.check_tokens),
                max_num_seqs=n, prompts=prompts, check_prompts=check, check_tokens=args.check_tokens,
                decode_tokens=args.decode_tokens, batches=[args.batch])
    parts = args.parts.split(",")
    results: dict = {}
    if "reference" in parts:
        results["reference"] = run_job(args.work, dict(name="reference", kind="reference", model=str(ckpt),
                                                      device=args.device, dtype=args.dtype, presets=presets,
                                                      check_prompts=check, check_tokens=args.check_tokens), deadline, 60)
    if "llama" in parts:
        results["llama"] = run_job(args.work, {**base, "name": "vllm-llama", "kind": "engine", "model": str(teacher),
                                               "batches": sorted({args.batch, *spec_batches})}, deadline, args.engine_estimate_s)
    def preset_job(preset: str) -> None:
        batches = sorted({args.batch, *spec_batches}) if preset == "all-fa" else [args.batch]
        results[f"preset:{preset}"] = run_job(args.work, {**base, "name": f"vllm-{preset}", "kind": "engine",
                                                          "model": str(ckpt), "hf_overrides": {"preset": preset},
                                                          "batches": batches}, deadline, args.engine_estimate_s)

    # all-fa first: the speculative and switchable parts compare against it; the other presets last
    if "presets" in parts and "all-fa" in presets:
        preset_job("all-fa")
    if "switchable" in parts:
        sw = [s for s in args.switch_presets.split(",") if s in presets]
        results["switchable"] = run_job(args.work, {**base, "name": "vllm-switchable", "kind": "switchable",
                                                    "model": str(ckpt), "hf_overrides": {"switchable": True},
                                                    "enforce_eager": True, "presets": sw, "batch": args.batch},
                                        deadline, args.engine_estimate_s)
    draft = args.draft if args.draft in presets else presets[-1]
    if "speculative" in parts:
        results["speculative"] = run_job(args.work, {
            **base, "name": f"vllm-spec-{draft}-k{args.k}", "kind": "engine", "model": str(ckpt),
            "hf_overrides": {"preset": "all-fa", "draft_preset": draft}, "batches": spec_batches, "log_stats": True,
            "speculative_config": {"method": "custom_class", "model": "supernet.serving.drafter.SupernetDrafter",
                                   "num_speculative_tokens": args.k}}, deadline, args.engine_estimate_s * 2)
    if "presets" in parts:
        for preset in presets:
            if preset != "all-fa":
                preset_job(preset)
    report = summarise(args, presets, draft)
    if "compare" in parts and report.get("greedy_pairs"):
        cmp = run_job(args.work, dict(name="compare", kind="compare", model=str(ckpt), device=args.device, dtype=args.dtype,
                                      check_prompts=check, pairs=report["greedy_pairs"]), deadline, 60)
        report["greedy_vs_reference"] = cmp
    report.pop("greedy_pairs", None)
    print_report(report)
    out = args.out or ROOT / "benchmarks" / "results" / f"vllm_{'gpu_h200' if args.device == 'cuda' else 'cpu_smoke'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


def _load(work: Path, name: str) -> dict | None:
    f = work / f"{name}.json"
    return json.loads(f.read_text()) if f.exists() else None


def summarise(args, presets: list[str], draft: str) -> dict:
    """The report from whatever jobs have results in --work (partial runs give partial reports)."""
    w = args.work
    b = str(args.batch)
    rows = []
    llama = _load(w, "vllm-llama")
    fa = _load(w, "vllm-all-fa")
    for preset in presets:
        r = _load(w, f"vllm-{preset}")
        if r and b in r.get("rates", {}):
            rows.append({"preset": preset, "decode_tokens_per_s": r["rates"][b]["decode_tokens_per_s"],
                         "max_concurrency": r.get("max_concurrency"), "kv_cache_tokens": r.get("kv_cache_tokens"),
                         "engine_start_s": r.get("engine_start_s")})
    base = next((r["decode_tokens_per_s"] for r in rows if r["preset"] == "all-fa"), None)
    for r in rows:
        r["vs_all_fa"] = r["decode_tokens_per_s"] / base if base else None
    report: dict = {"settings": {"context": args.context, "batch": args.batch, "dtype": args.dtype,
                                 "decode_tokens": args.decode_tokens, "swa_window": args.swa_window,
                                 "vllm": _vllm_version(), "device": _device()},
                    "presets": rows}
    if llama and fa and b in llama["rates"] and b in fa["rates"]:
        report["ours_vs_vllm_llama"] = {
            "vllm_llama_tokens_per_s": llama["rates"][b]["decode_tokens_per_s"],
            "ours_all_fa_tokens_per_s": fa["rates"][b]["decode_tokens_per_s"],
            "ratio": fa["rates"][b]["decode_tokens_per_s"] / llama["rates"][b]["decode_tokens_per_s"],
            "llama_max_concurrency": llama.get("max_concurrency"), "ours_max_concurrency": fa.get("max_concurrency"),
            "greedy_equal_llama_vs_all_fa": llama["greedy"] == fa["greedy"]}
    sw = _load(w, "vllm-switchable")
    if sw:
        report["switchable"] = {k: sw[k] for k in ("single_preset", "mixed", "shares", "mixed_step_s",
                                                    "token_weighted_step_s", "mixed_over_weighted") if k in sw}
        report["switchable"]["max_concurrency"] = sw.get("max_concurrency")
    spec = _load(w, f"vllm-spec-{draft}-k{args.k}")
    if spec:
        rows_spec = []
        for bs, r in spec["rates"].items():
            alone = (fa or {}).get("rates", {}).get(bs, {}).get("decode_tokens_per_s")
            rows_spec.append({"batch": int(bs), "draft": draft, "k": args.k, "tokens_per_s": r["decode_tokens_per_s"],
                              "target_alone_tokens_per_s": alone,
                              "speedup": r["decode_tokens_per_s"] / alone if alone else None,
                              "acceptance_rate": r.get("acceptance_rate"), "greedy_identical_to_target": None})
        if fa:
            for row in rows_spec:
                row["greedy_identical_to_target"] = spec["greedy"] == fa["greedy"]
        report["speculative"] = rows_spec
    elif (w / f"vllm-spec-{draft}-k{args.k}.log").exists():
        report["speculative_partial"] = partial_from_log(w / f"vllm-spec-{draft}-k{args.k}.log", fa, draft, args.k)
    ref = _load(w, "reference")
    if ref:
        pairs = {}
        for preset in presets:
            r = _load(w, f"vllm-{preset}")
            if r:
                pairs[preset] = (ref["greedy"][preset], r["greedy"])
        if sw:
            for preset, toks in sw["greedy"].items():
                pairs[f"switchable:{preset}"] = (ref["greedy"][preset], toks)
        report["greedy_pairs"] = pairs
        report["switchable_greedy_equal_single"] = {
            p: toks == _load(w, f"vllm-{p}")["greedy"] for p, toks in (sw or {}).get("greedy", {}).items()
            if _load(w, f"vllm-{p}")}
    failed = sorted(f.stem for f in w.glob("*.failed"))
    if failed:
        report["failed_jobs"] = {name: (w / f"{name}.failed").read_text()[-2000:] for name in failed}
    return report


def partial_from_log(log: Path, fa: dict | None, draft: str, k: int) -> dict:
    """A speculative job that ran out of time: the batches it finished, from its own log lines
    (`[job] batch B: X tok/s`), and vLLM's acceptance figures that it logged meanwhile."""
    text = log.read_text(errors="replace")
    rows = []
    for b, rate in re.findall(r"\] batch (\d+): ([\d.]+) tok/s", text):
        alone = (fa or {}).get("rates", {}).get(b, {}).get("decode_tokens_per_s")
        rows.append({"batch": int(b), "draft": draft, "k": k, "tokens_per_s": float(rate),
                     "target_alone_tokens_per_s": alone, "speedup": float(rate) / alone if alone else None})
    acceptance = [float(a) / 100 for a in re.findall(r"Avg Draft acceptance rate: ([\d.]+)%", text)]
    return {"note": "the job hit the call's time limit; figures read from its log", "finished_batches": rows,
            "logged_acceptance_rates": acceptance}


def _vllm_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("vllm")
    except Exception:  # noqa: BLE001  (a report without vLLM installed)
        try:
            from importlib.metadata import version

            return version("vllm-cpu")
        except Exception:  # noqa: BLE001
            return None


def _device() -> str:
    from benchmarks.common import device_name

    return device_name()


def print_report(report: dict) -> None:
    from benchmarks.common import print_table

    s = report["settings"]
    if report["presets"]:
        print_table(report["presets"], ["preset", "decode_tokens_per_s", "vs_all_fa", "max_concurrency", "engine_start_s"],
                    f"vLLM {s['vllm']} decode, batch {s['batch']}, context {s['context']}, {s['dtype']} ({s['device']})")
    if "ours_vs_vllm_llama" in report:
        o = report["ours_vs_vllm_llama"]
        print(f"\nours all-fa / vLLM's Llama: {o['ratio']:.3f} ({o['ours_all_fa_tokens_per_s']:.0f} vs "
              f"{o['vllm_llama_tokens_per_s']:.0f} tok/s); greedy equal: {o['greedy_equal_llama_vs_all_fa']}")
    if "switchable" in report:
        print(f"switchable: mixed step / token-weighted single-preset step = {report['switchable']['mixed_over_weighted']:.3f}")
    for row in report.get("speculative", []):
        print(f"speculative batch {row['batch']}: {row['speedup']} x, acceptance {row['acceptance_rate']}, "
              f"identical {row['greedy_identical_to_target']}")
    for preset, rows in (report.get("greedy_vs_reference") or {}).items():
        if isinstance(rows, list):
            print(f"greedy vs reference, {preset}: first differences {[r['first_difference'] for r in rows]}")
    for name in report.get("failed_jobs", {}):
        print(f"FAILED: {name}")


if __name__ == "__main__":
    main()
