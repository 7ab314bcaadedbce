"""The whole pipeline, step by step: convert -> transfer (optional) -> distill -> evaluate placements ->
costs -> presets -> measure each preset (speed, quality, retrieval, benchmark tasks) -> self-speculative
decoding.

A library module at the top of the package, not under cli/ or measure/: it is the workflow that
strings the commands together (convert, distill, eval-placements, costs and optimize run as the
user would run them, in subprocesses, so each step's output and resumability are those of the CLI)
and then measures with supernet.measure. Its callers are a command (`supernet demo`) and a script
(`benchmarks/e2e.py`); neither holds any of its logic.

`supernet demo` runs a miniature on the CPU; `benchmarks/e2e.py` runs the full size on a GPU. Each
step writes its files into the work folder and is skipped when they exist, so an interrupted run
resumes where it stopped (each step also runs as its own command: `--step NAME`).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from rich.console import Console

console = Console(stderr=True)
REPO = Path(__file__).resolve().parents[1]
STEPS = ("convert", "transfer", "distill", "evaluate", "costs", "presets", "measure", "speculative", "report")


@dataclass
class PipelineSettings:
    workdir: Path
    teacher: str = "smollm2"
    train_data: str = "../shared/data/pydocs-train.jsonl"
    eval_data: str = "../shared/data/pydocs-eval.jsonl"
    swa_window: int = 512
    distill_config: str = "training/configs/smollm2_h100.yaml"
    distill_steps: int = 400
    distill_set: list[str] = field(default_factory=list)
    # the recipe's first stage (issue 17): layer-local transfer for transfer_steps before distillation
    # (0: none, distillation starts from the converted teacher)
    transfer_steps: int = 0
    transfer_config: str = "training/configs/transfer_smollm2_h100.yaml"
    transfer_set: list[str] = field(default_factory=list)
    eval_n: int = 200
    eval_seq_len: int = 512
    eval_sequences: int = 32
    eval_batch: int = 8
    eval_seconds: float | None = None  # time budget of the evaluate step (None: until eval_n)
    eval_min: int = 40  # with eval_seconds: fewer evaluations than this is a failure
    cost_context: int = 8192
    cost_batch: int = 64
    measure_costs: bool = True
    calibrate_costs: bool = False  # with measure_costs: scale each mixer's cost to its all-<mixer> whole-model step
    speedups: list[float] = field(default_factory=lambda: [1.5, 2.0, 3.0, 4.0])
    quality_seq_len: int = 1024
    quality_sequences: int = 64
    throughput_batch: int = 64
    throughput_context: int = 8192
    # further contexts at which every preset's decode speed is timed against all-fa (e.g. 32768); the
    # table's first speed column stays throughput_context, the contexts the presets were optimised at
    extra_contexts: list[int] = field(default_factory=list)
    extra_context_rounds: int = 2
    # also measure all-swa, all-gdn and all-kda beside the presets (the recipe's per-mixer retention)
    measure_uniform: bool = False
    throughput_tokens: int = 64
    throughput_rounds: int = 3  # timed passes over all presets in turn; the median of all windows counts
    throughput_windows: int = 2  # timed windows of throughput_tokens steps after each prefill
    throughput_clock: str = "wall"  # or "cpu": the process's CPU time, robust on a shared CPU machine
    needle_contexts: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    spec_k: int = 4
    spec_tokens: int = 128
    spec_prompts: int = 4
    # self-speculation in the batched engine (graphed on CUDA) at these batches and spec_context, with
    # every preset >= 1.5x as a draft and the cost model's pick (the speculative step); []: not run
    spec_batches: list[int] = field(default_factory=list)
    spec_context: int = 8192
    spec_ks: list[int] = field(default_factory=lambda: [2, 4])
    spec_batched_tokens: int = 64
    spec_min_speedup: float = 1.5  # drafts: presets measured at least this much faster than all-fa
    # benchmark tasks (supernet/measure/task_sets.py): retrieval and development tasks per evaluated placement,
    # and per preset retrieval, development and held-out task accuracy in the report; None: no tasks
    task_set: str | None = None
    # with a task set: one more preset optimised under this requirement, beside the unconstrained ones
    constrained_require: str | None = "retrieval>=0.9*teacher"
    device: str = "auto"
    # eval-placements --sparse-share: placements with 1..L/4 layers changed from all-fa (None: its default,
    # 0.25 of --n when retrieval is recorded, since retrieval is ~0 on random placements)
    eval_sparse_share: float | None = None
    # the constrained preset is verified (placement/verify.py): at most this many new measurements per speedup
    # target, and at most constrained_measurements in all
    constrained_rounds: int = 4
    constrained_measurements: int = 12
    # judge a constrained candidate also on the documents the report scores presets on (the task set's report
    # limits), so the preset kept keeps its requirement in the report too
    constrained_confirm: bool = True

    @property
    def ckpt_init(self) -> Path:
        return self.workdir / "supernet-init"

    @property
    def transfer_dir(self) -> Path:
        return self.workdir / "transfer"

    @property
    def distill_start(self) -> Path:
        """The checkpoint distillation starts from: transfer's result, else the converted teacher."""
        return self.transfer_dir / "final" if self.transfer_steps else self.ckpt_init

    @property
    def distill_dir(self) -> Path:
        return self.workdir / "distill"

    @property
    def trained(self) -> Path:
        return self.distill_dir / "final"

    @property
    def final(self) -> Path:
        return self.workdir / "supernet-final"


def find_corpus(name: str) -> str:
    """A corpus file: under $SUPERNET_DATA, the shared data folder beside the repo, or ./data."""
    for base in (os.environ.get("SUPERNET_DATA"), REPO.parent / "shared" / "data", Path.cwd() / "data"):
        if base and (Path(base) / name).exists():
            return str(Path(base) / name)
    raise FileNotFoundError(f"corpus file {name} not found; set SUPERNET_DATA to a folder with "
                            "pydocs-train/eval.jsonl (or pass --train-data/--eval-data)")


def demo_settings(workdir: Path, train_data: str, eval_data: str) -> PipelineSettings:
    """`supernet demo`'s sizes: the pipeline in minutes on 2 CPU cores (see the README)."""
    return PipelineSettings(
        workdir=workdir, teacher="smollm2", train_data=train_data, eval_data=eval_data, swa_window=64,
        distill_config=str(REPO / "training" / "configs" / "demo_cpu.yaml"), distill_steps=8,
        eval_n=36, eval_seq_len=128, eval_sequences=4, eval_batch=4,
        # presets for the setting the demo times (batch 4, context 512, this CPU): costs measured here,
        # scaled to whole all-<mixer> steps, so that predicted and measured speedups agree; the report
        # adds what the same presets would give on the H200 profile at batch 64, context 8192. At batch 1
        # and context 256 the 135M model's weights are nearly the whole step: all-swa timed within noise
        # of all-fa (43.6 vs 44.1 ms in one run), leaving no speedup to optimise for
        cost_context=512, cost_batch=4, measure_costs=True, calibrate_costs=True, speedups=[1.5, 2.0, 3.0],
        quality_seq_len=128, quality_sequences=8, throughput_batch=4, throughput_context=512,
        # the needle test at 256/512 is left to the task set's RULER niah at the same lengths (more documents)
        throughput_tokens=16, needle_contexts=[], spec_k=4, spec_tokens=24, spec_prompts=1,
        # benchmark tasks at the demo's scale (retrieval at 256 and 512 tokens, see task_sets.py), and one preset
        # optimised under retrieval >= 0.9 x the teacher beside the unconstrained ones
        task_set="demo", constrained_require="retrieval>=0.9*teacher", device="cpu",
    )


def _run(cmd: list[str], log: Path, seconds: float | None = None) -> bool:
    """Run one CLI step, echoing its output to the console and a log file; fail loudly.

    With `seconds`, a step still running then is interrupted (SIGINT: Python stops between two
    statements, so a resumable step's last appended record is whole) and False is returned."""
    console.print(f"$ {' '.join(cmd)}", style="bold cyan", markup=False)
    log.parent.mkdir(parents=True, exist_ok=True)
    deadline = None if seconds is None else time.monotonic() + seconds
    interrupted = False
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        # a shell's background job inherits SIGINT ignored, and a Python child then never raises
        # KeyboardInterrupt: the budgeted step gets the default disposition back
        restore = None if deadline is None else _default_sigint
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                preexec_fn=restore)
        assert proc.stdout is not None
        if deadline is not None:
            threading.Thread(target=_interrupt_at, args=(proc, deadline), daemon=True).start()
        for line in proc.stdout:
            sys.stderr.write(line)
            fh.write(line)
        code = proc.wait()
        interrupted = deadline is not None and time.monotonic() >= deadline
        if code != 0 and not interrupted:
            raise RuntimeError(f"step failed ({' '.join(cmd[:3])} ...): see {log}")
    return not interrupted


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_at(proc: subprocess.Popen, deadline: float) -> None:
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(1.0)
    if proc.poll() is None:
        console.print("[yellow]time budget reached: interrupting the step[/]")
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()


def _supernet() -> list[str]:
    return [sys.executable, "-m", "supernet.cli.main"]


def _device(s: PipelineSettings) -> str:
    if s.device != "auto":
        return s.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# -- steps ---------------------------------------------------------------------------------------
def step_convert(s: PipelineSettings) -> None:
    if (s.ckpt_init / "config.json").exists():
        return
    _run(_supernet() + ["convert", s.teacher, str(s.ckpt_init), "--swa-window", str(s.swa_window)], s.workdir / "log.txt")


def _training_command(s: PipelineSettings, stage: str, config: str, out_dir: Path, steps: int, student: Path,
                      overrides: list[str]) -> list[str]:
    cmd = _supernet() + [
        stage, config, "--out-dir", str(out_dir), "--max-steps", str(steps),
        "--set", f"student.path={student}", "--set", f"teacher.path={s.teacher}",
        "--set", f"data.train=[{s.train_data}]", "--set", f"data.eval=[{s.eval_data}]",
    ]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def step_transfer(s: PipelineSettings) -> None:
    """Layer-local transfer (every trainable mixer regresses the teacher attention's output), the
    recipe's first stage; skipped when transfer_steps is 0. Resumes from its own checkpoints."""
    if not s.transfer_steps or (s.distill_start / "config.json").exists():
        return
    _run(_training_command(s, "transfer", s.transfer_config, s.transfer_dir, s.transfer_steps, s.ckpt_init,
                           s.transfer_set), s.workdir / "log.txt")


def step_distill(s: PipelineSettings) -> None:
    if (s.trained / "config.json").exists():
        return
    _run(_training_command(s, "distill", s.distill_config, s.distill_dir, s.distill_steps, s.distill_start,
                           s.distill_set), s.workdir / "log.txt")


def _count_lines(path: Path) -> int:
    return sum(1 for _ in path.open()) if path.exists() else 0


def step_evaluate(s: PipelineSettings) -> None:
    """Placements measured for the surrogate, up to eval_n; with eval_seconds, as many as fit in that
    time (at least eval_min), so that one GPU allocation still reaches the later steps."""
    out = s.workdir / "evaluations.jsonl"
    if _count_lines(out) >= s.eval_n:
        return
    finished = _run(_supernet() + [
        "eval-placements", str(s.trained), "--data", s.eval_data, "--n", str(s.eval_n), "--out", str(out),
        "--seq-len", str(s.eval_seq_len), "--sequences", str(s.eval_sequences), "--batch-size", str(s.eval_batch),
        "--context", str(s.cost_context), "--batch", str(s.cost_batch), "--device", _device(s),
    ] + (["--task-set", s.task_set] if s.task_set else [])
      + (["--sparse-share", str(s.eval_sparse_share)] if s.eval_sparse_share is not None else []),
        s.workdir / "log.txt", seconds=s.eval_seconds)
    if not finished:
        done = _count_lines(out)
        if done < s.eval_min:
            raise RuntimeError(f"only {done} placements evaluated within eval_seconds={s.eval_seconds}; the surrogate "
                               f"needs at least {s.eval_min}: raise eval_seconds or lower eval_min")
        console.print(f"[yellow]evaluate: {done} of {s.eval_n} placements within the {s.eval_seconds:.0f} s budget; "
                      "going on with those[/]")


def step_costs(s: PipelineSettings) -> None:
    out = s.workdir / "costs.json"
    if out.exists():
        return
    cmd = _supernet() + ["costs", str(s.trained), "--context", str(s.cost_context), "--batch", str(s.cost_batch),
                         "--out", str(out), "--device", _device(s)]
    if s.measure_costs:
        cmd += ["--measure", "--layers", "0"]
        if s.calibrate_costs:  # the whole-step timing protocol of the measure step, so the two agree
            cmd += ["--repeats", "3", "--calibrate", "--calibrate-tokens", str(s.throughput_tokens), "--calibrate-rounds",
                    str(s.throughput_rounds), "--calibrate-windows", str(s.throughput_windows),
                    "--calibrate-clock", s.throughput_clock]
    _run(cmd, s.workdir / "log.txt")


def step_presets(s: PipelineSettings) -> None:
    out = s.workdir / "presets.json"
    if out.exists() and (s.final / "config.json").exists():
        return
    from supernet.placement.cost import load_costs

    costs = load_costs(s.workdir / "costs.json")
    num_layers = json.loads((s.trained / "config.json").read_text())["num_hidden_layers"]
    matrix = costs.matrix(list(costs.mixers), num_layers)
    max_speedup = costs.reference_cost(num_layers) / (costs.fixed + matrix.min(axis=1).sum())
    speedups = sorted({*(x for x in s.speedups if x < max_speedup), round(max_speedup * 0.999, 3)})
    if len(speedups) < 3 and max_speedup > 1.03:  # few targets reachable here (a CPU at batch 1): space them out
        speedups = sorted({*speedups, *(round(1 + (max_speedup - 1) * f, 3) for f in (1 / 3, 2 / 3))})
    cmd = [sys.executable, "-m", "supernet.cli.placement_cli", "optimize", "--evaluations", str(s.workdir / "evaluations.jsonl"),
           "--costs", str(s.workdir / "costs.json"), "--out", str(out), "--plot", str(s.workdir / "frontier.png"),
           "--frontier", "--save-surrogate", str(s.workdir / "surrogate.json")]
    for x in speedups:
        cmd += ["--speedup", str(x)]
    _run(cmd, s.workdir / "log.txt")
    if s.task_set and s.constrained_require:
        add_constrained_preset(s, out, speedups)
    install_presets(s.trained, out, s.final)


def add_constrained_preset(s: PipelineSettings, presets_json: Path, speedups: list[float]) -> None:
    """One more preset, optimised for quality under `s.constrained_require` (e.g. retrieval >= 0.9 x the
    teacher) and verified by measurement (supernet/measure/verified_preset.py, placement/verify.py): each
    candidate is measured with eval-placements' scorer (appended to evaluations.jsonl and refitted) and
    confirmed on the report's documents; the best measured placement that meets the requirement is kept.
    Targets: the middle speedup, else the lower ones and points between the lowest and 1x (where a CPU's
    few reachable speedups all lose retrieval), then the speedups of the fastest evaluated placements
    that kept the requirement (`target_from` says so). Appended to presets.json as `<name>-<metric>`
    with its measured metrics; when no target admits a verified placement: no preset, and the message
    (also in presets.json under "constrained")."""
    from supernet.measure.placement_metrics import build_placement_scorer
    from supernet.measure.task_sets import task_set
    from supernet.measure.verified_preset import add_to_presets, confirm_scorer, verified_preset
    from supernet.placement.cost import load_costs
    from supernet.placement.multimetric import parse_requirement

    requirement = parse_requirement(s.constrained_require)
    order = sorted(speedups)
    middle = len(order) // 2
    below = [round(1 + (order[0] - 1) * f, 3) for f in (0.75, 0.5, 0.25)] if order and order[0] > 1.01 else []
    targets = list(dict.fromkeys([order[middle]] + order[:middle][::-1] + below))
    # the scorer eval-placements measured evaluations.jsonl with (the evaluate step's options)
    scorer = build_placement_scorer(s.trained, s.eval_data, s.eval_seq_len, s.eval_sequences, 64, s.eval_batch,
                                    device=_device(s), task_set=s.task_set, log=console.print)
    chosen = task_set(s.task_set)
    confirm = confirm_scorer(scorer, requirement.metric, chosen.retrieval_tasks(), chosen.dev_tasks(),
                             chosen.report_limits(), corpus=s.eval_data, log=console.print) if s.constrained_confirm else None
    row, record = verified_preset(s.workdir / "evaluations.jsonl", load_costs(s.workdir / "costs.json"),
                                  requirement.text, targets, scorer, confirm, rounds=s.constrained_rounds,
                                  measurements=s.constrained_measurements, log=console.print)
    if row is None:
        console.print(f"[yellow]{record['message']}[/]")
    else:
        console.print(f"[green]constrained preset {row['name']}[/]: {row['counts']} at {row['speedup']:.3f}x, measured "
                      f"{requirement.metric} {row['measured'][requirement.metric]:.3f}"
                      + (f", confirmed {row['confirmed'][requirement.metric]:.3f}" if row["confirmed"] else "")
                      + f", quality {row['measured']['quality']:.4f}")
    add_to_presets(presets_json, row, record)


def install_presets(ckpt: Path, presets_json: Path, out: Path) -> None:
    """Copy a checkpoint and install the optimised presets into the copy (no weights change)."""
    import shutil

    from supernet.install_presets import install_presets as install

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(ckpt, tmp)
    install(tmp, presets_json, overwrite=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def step_measure(s: PipelineSettings) -> None:
    """Per preset: decode throughput vs all-fa (same run), quality on held-out text, needle retrieval."""
    out = s.workdir / "measurements.json"
    if out.exists():
        return
    import torch
    from transformers import AutoTokenizer

    from supernet.layout import Placement
    from supernet.measure.needle import needle_score
    from supernet.measure.quality import build_evaluator
    from supernet.measure.speculative import measure_speculative
    from supernet.measure.throughput import compare_decode
    from supernet.placement.cost import load_costs
    from supernet.placement.evaluate import load_texts

    device = _device(s)
    evaluator, model = build_evaluator(s.final, s.eval_data, seq_len=s.quality_seq_len, sequences=s.quality_sequences,
                                       top_k=0, batch_size=s.eval_batch, device=device)
    tokenizer = AutoTokenizer.from_pretrained(s.final)
    haystack = load_texts(s.eval_data)
    layers = model.config.num_hidden_layers
    presets = {"all-fa": Placement.uniform("fa", layers), **model.presets}
    if s.measure_uniform:  # each mixer alone, the recipe's per-mixer retention (unless a preset already is one)
        taken = {tuple(p) for p in presets.values()}
        presets.update({f"all-{m}": Placement.uniform(m, layers) for m in ("swa", "gdn", "kda")
                        if tuple(Placement.uniform(m, layers)) not in taken})
    timed = _distinct(presets)  # name -> placement, one name per distinct placement
    same = {name: next(n for n, q in timed.items() if tuple(q) == tuple(p)) for name, p in presets.items()}
    info = json.loads((s.workdir / "presets.json").read_text())
    predicted = {p["name"]: p for p in info["presets"]}
    costs = load_costs(s.workdir / "costs.json")
    speeds = compare_decode(model, timed, batch=s.throughput_batch, context=s.throughput_context,
                            new_tokens=s.throughput_tokens, rounds=s.throughput_rounds, windows=s.throughput_windows,
                            clock=s.throughput_clock)
    by_context = {s.throughput_context: speeds}
    for context in s.extra_contexts:
        by_context[context] = _speeds_at(s, model, timed, context)
    tasks = _preset_task_scorer(s, model, tokenizer)
    scored: dict[tuple, dict] = {}  # identical placements (all-fa and a non-sliding `teacher`) are scored once
    judged: dict[str, tuple[dict, dict]] = {}
    rows = []
    for name, placement in presets.items():
        console.print(f"[bold]measuring {name}[/] ({placement.summary()})")
        if same[name] not in judged:
            judged[same[name]] = (evaluator(placement), needle_score(model, tokenizer, placement, haystack,
                                                                     contexts=s.needle_contexts))
        quality, needle = judged[same[name]]
        speed = speeds[same[name]]
        info_row = predicted.get(name, {})
        rows.append({"preset": name, "placement": placement.to_list(), "counts": placement.counts(),
                     # a uniform reference row is not a preset: its prediction comes from the same cost table
                     "predicted_speedup": info_row.get("speedup", costs.speedup(placement)),
                     "predicted_quality": info_row.get("predicted_quality"),
                     "predicted": info_row.get("predicted"), "requirements": info_row.get("requirements", []),
                     "quality": quality["quality"], "kl": quality["kl"], "top1_agreement": quality["top1_agreement"],
                     "tokens_per_s": speed["tokens_per_s"], "ms_per_step": speed["ms_per_step"],
                     "ms_per_step_min": speed["ms_per_step_min"], "ms_per_step_max": speed["ms_per_step_max"],
                     "ms_per_step_windows": speed["ms_per_step_windows"],
                     "speed_by_context": {str(c): _speed_cells(table.get(same[name])) for c, table in by_context.items()},
                     "needle": needle, **({"same_as": same[name]} if same[name] != name else {})})
        if tasks is not None:
            key = tuple(placement.to_list())
            if key not in scored:
                t0 = time.perf_counter()
                scored[key] = tasks(placement)
                console.print(f"  tasks in {time.perf_counter() - t0:.1f}s: " + ", ".join(
                    f"{k} {scored[key][k]:.3f}" for k in ("retrieval", "dev_tasks", "heldout_tasks") if k in scored[key]))
            rows[-1]["tasks"] = dict(scored[key])
        if device == "cuda":
            torch.cuda.empty_cache()
    base = rows[0]
    for r in rows:
        r["decode_speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
        # the spread: this preset's slowest and fastest window against all-fa's median
        r["decode_speedup_range"] = [base["ms_per_step"] / r["ms_per_step_max"], base["ms_per_step"] / r["ms_per_step_min"]]
        r["quality_retention"] = r["quality"] / base["quality"] if base["quality"] else None
        for c, cell in r["speed_by_context"].items():
            ref = base["speed_by_context"][c]
            if cell.get("ms_per_step") and ref.get("ms_per_step"):
                cell["speedup"] = ref["ms_per_step"] / cell["ms_per_step"]
                cell["speedup_range"] = [ref["ms_per_step"] / cell["ms_per_step_max"],
                                         ref["ms_per_step"] / cell["ms_per_step_min"]]
        if tasks is not None:
            from supernet.measure.report import task_retention

            r["tasks"].update(task_retention(r, base, tasks.lengths))
    spec = measure_speculative(model, tokenizer, haystack, rows, k=s.spec_k, new_tokens=s.spec_tokens,
                               prompts=s.spec_prompts, log=console.print)
    from supernet.measure.costs import device_name

    payload = {"device_name": device_name(next(model.parameters()).device),
               "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()},
               "quality_metric": evaluator.metric, "presets": rows, "speculative": spec}
    if tasks is not None:
        from supernet.measure.task_sets import task_set

        chosen = task_set(s.task_set)
        payload["task_set"] = {"name": chosen.name, "note": chosen.note, "limits": chosen.report_limits(),
                               "retrieval": tasks.retrieval, "dev": tasks.dev, "heldout": tasks.heldout,
                               "retrieval_lengths": {str(k): v for k, v in chosen.retrieval_lengths().items()},
                               "chance": tasks.chance, "reference": "all-fa"}
    out.write_text(json.dumps(payload, indent=2) + "\n")


def _distinct(presets: dict) -> dict:
    """The first name of each placement: a copy (a non-sliding teacher's `teacher` preset is all-fa,
    two speedup targets can give one placement) is timed and scored once, its row copies the result."""
    out: dict = {}
    for name, placement in presets.items():
        if not any(tuple(p) == tuple(placement) for p in out.values()):
            out[name] = placement
    return out


def _speeds_at(s: PipelineSettings, model, presets: dict, context: int) -> dict[str, dict]:
    """Every preset's decode speed at one more context, side by side in one pass. A failure there (a
    32K cache that does not fit, say) is recorded and does not cost the run its other measurements."""
    from supernet.measure.throughput import compare_decode

    try:
        return compare_decode(model, presets, batch=s.throughput_batch, context=context,
                              new_tokens=s.throughput_tokens, rounds=s.extra_context_rounds,
                              windows=s.throughput_windows, clock=s.throughput_clock)
    except Exception as exc:  # noqa: BLE001 - reported in measurements.json, the rest of the step goes on
        console.print(f"[red]decode speed at context {context} failed: {type(exc).__name__}: {exc}[/]")
        return {name: {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"} for name in presets}
    finally:
        _free_device_memory()


def _free_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _speed_cells(row: dict | None) -> dict:
    keys = ("tokens_per_s", "ms_per_step", "ms_per_step_min", "ms_per_step_max", "prefill_s", "error")
    return {k: row[k] for k in keys if row and k in row}


def _preset_task_scorer(s: PipelineSettings, model, tokenizer):
    """The task set's retrieval, development and held-out tasks, loaded once, scored per preset."""
    if not s.task_set:
        return None
    from supernet.measure.placement_metrics import TaskMetrics
    from supernet.measure.task_sets import task_set

    chosen = task_set(s.task_set)
    return TaskMetrics(model, tokenizer, chosen.retrieval_tasks(), chosen.dev_tasks(), chosen.report_limits(),
                       corpus=s.eval_data, log=console.print, heldout=chosen.heldout_tasks())


def step_speculative(s: PipelineSettings) -> None:
    """Self-speculative decoding at serving batches (speculative.json, read by the report)."""
    out = s.workdir / "speculative.json"
    if not s.spec_batches or out.exists():
        return
    import torch
    from transformers import AutoTokenizer

    from supernet.measure.quality import load_supernet
    from supernet.measure.speculative import measure_batched_speculative
    from supernet.placement.cost import load_costs
    from supernet.placement.evaluate import load_texts

    model = load_supernet(s.final, torch.device(_device(s)))
    tokenizer = AutoTokenizer.from_pretrained(s.final)
    rows = json.loads((s.workdir / "measurements.json").read_text())["presets"]
    texts = list(load_texts(s.eval_data)) + list(load_texts(s.train_data))  # b64 x 8K needs more than eval text
    result = measure_batched_speculative(model, tokenizer, texts, rows, batches=s.spec_batches, context=s.spec_context,
                                         new_tokens=s.spec_batched_tokens, table=load_costs(s.workdir / "costs.json"),
                                         ks=s.spec_ks, min_speedup=s.spec_min_speedup, log=console.print)
    out.write_text(json.dumps(result, indent=2) + "\n")


def step_report(s: PipelineSettings) -> None:
    from supernet.measure.report import write_report

    write_report(s.workdir)


STEP_FUNCTIONS: dict[str, Callable[[PipelineSettings], None]] = {
    "convert": step_convert, "transfer": step_transfer, "distill": step_distill, "evaluate": step_evaluate, "costs": step_costs,
    "presets": step_presets, "measure": step_measure, "speculative": step_speculative, "report": step_report,
}


def run_pipeline(s: PipelineSettings, steps: tuple[str, ...] = STEPS) -> None:
    s.workdir.mkdir(parents=True, exist_ok=True)
    (s.workdir / "settings.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                         for k, v in asdict(s).items()}, indent=2))
    for name in steps:
        t0 = time.time()
        console.rule(f"[bold]{name}")
        STEP_FUNCTIONS[name](s)
        console.print(f"[green]{name} done[/] in {time.time() - t0:.0f}s; files in {s.workdir}")
