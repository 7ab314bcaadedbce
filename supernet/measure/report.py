"""The results table and the speed-quality plot of a pipeline run (from measurements.json)."""
from __future__ import annotations

import json
import math
from pathlib import Path


AGREEMENT = 0.20  # issue 18: the demo's measured speedups within 20% of the predicted ones
GPU_SETTING = {"profile": "h200", "batch": 64, "context": 8192}  # the second, predicted-only column


def agreement(measurements: dict) -> dict:
    """Measured against predicted speedup, per preset (all-fa is 1 by definition)."""
    rows = {}
    for r in measurements["presets"][1:]:
        predicted = float(r.get("predicted_speedup") or 1.0)
        rows[r["preset"]] = {"measured": r["decode_speedup"], "predicted": predicted,
                             "error": r["decode_speedup"] / predicted - 1}
    worst = max(rows.items(), key=lambda kv: abs(kv[1]["error"]), default=None)
    return {"tolerance": AGREEMENT, "presets": rows,
            "all_within": all(abs(v["error"]) <= AGREEMENT for v in rows.values()),
            "worst": {"preset": worst[0], **worst[1]} if worst else None}


TASK_KEYS = ("retrieval", "dev_tasks", "heldout_tasks")


def task_retention(row: dict, base: dict, lengths: dict[str, int]) -> dict:
    """A preset's task columns against the teacher's row (all-fa) measured on the same documents:
    retention per score, retrieval per length, and whether each requirement it was optimised under holds."""
    t, b = row["tasks"], base["tasks"]
    out: dict = {f"{k}_retention": (t[k] / b[k] if b[k] else None) for k in TASK_KEYS if k in t and k in b}
    by_length: dict[str, list[float]] = {}
    for name, n in lengths.items():
        by_length.setdefault(str(n), []).append(t["task_scores"][name])
    out["retrieval_by_length"] = {n: sum(v) / len(v) for n, v in by_length.items()}
    out["requirements_check"] = [check_requirement(text, row, base) for text in row.get("requirements") or []]
    return out


def _measured(row: dict, metric: str) -> float:
    value = row.get("tasks", {}).get(metric, row.get(metric))
    if not isinstance(value, (int, float)):
        raise ValueError(f"preset {row['preset']!r} has no measured {metric!r} to check its requirement against")
    return float(value)


def check_requirement(text: str, row: dict, base: dict) -> dict:
    """A requirement (`retrieval>=0.9*teacher`) against the measured values; teacher = the all-fa row."""
    from supernet.placement.multimetric import parse_requirement

    req = parse_requirement(text)
    value, teacher = _measured(row, req.metric), _measured(base, req.metric)
    bound = req.bound(teacher)
    slack = 1e-9 * max(1.0, abs(bound))  # the values are means of 0/1 scores: only rounding to absorb
    met = value >= bound - slack if req.op == ">=" else value <= bound + slack
    return {"requirement": req.text, "metric": req.metric, "measured": value, "teacher": teacher, "bound": bound,
            "met": bool(met)}


def mean_standard_error(tasks: dict, names: list[str]) -> float:
    """Standard error of the mean accuracy over `names`: each task's binomial error, tasks independent."""
    var = 0.0
    for n in names:
        acc, count = tasks["task_scores"][n], max(1, tasks["task_n"].get(n, 0))
        var += acc * (1 - acc) / count
    return math.sqrt(var) / len(names) if names else 0.0


def length_tag(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens >= 1024 and tokens % 1024 == 0 else str(tokens)


def gpu_predictions(measurements: dict, config: dict | None) -> dict[str, float]:
    """What the same presets would give on the GPU profile at GPU_SETTING (a prediction, not a timing)."""
    if not config:
        return {}
    from supernet.layout import Placement
    from supernet.placement.observations import config_shape
    from supernet.placement.profile import load_profile, profile_costs

    table = profile_costs(config_shape(config), load_profile(GPU_SETTING["profile"]), GPU_SETTING["context"],
                          GPU_SETTING["batch"])
    return {r["preset"]: table.speedup(Placement.parse(r["placement"])) for r in measurements["presets"]}


def table_markdown(measurements: dict, cost_source: dict | None = None, gpu: dict[str, float] | None = None) -> str:
    from supernet.placement.cost import describe_cost_source

    rows = measurements["presets"]
    st = measurements.get("settings", {})
    needle_keys = list(rows[0]["needle"]) if rows else []
    gpu_head = (f"{GPU_SETTING['profile'].upper()} b{GPU_SETTING['batch']} x {GPU_SETTING['context'] // 1024}k "
                "(predicted)")
    head = ["preset", "fa/swa/gdn/kda", "decode speedup", "predicted", "measured / predicted"]
    extra = extra_contexts(measurements)
    head += [f"speedup@{length_tag(int(c))}" for c in extra]
    head += [gpu_head] if gpu else []
    head += ["quality (1-nKL)", "KL retention", "top-1 agree"]
    head += [f"needle@{k}" for k in needle_keys]
    task_info = measurements.get("task_set")
    lengths = sorted(int(n) for n in task_info["retrieval_lengths"]) if task_info else []
    if task_info:
        head += [f"retrieval@{length_tag(n)}" for n in lengths]
        head += ["retrieval retention", "dev acc", "dev retention", "held-out acc", "held-out retention"]
    where = describe_cost_source(cost_source) if cost_source else "the costs.json the presets were optimised with"
    timed = (f"batch {st.get('throughput_batch')}, context {st.get('throughput_context')}, device "
             f"{measurements.get('device_name') or st.get('device')}" if st else "this run's setting")
    lines = [f"Decode speedup: measured in one run against all-fa at {timed} (median of the timed windows, their "
             "range in brackets); predicted: the cost model's figure that the optimiser chose the preset by, "
             f"from costs {where}."]
    if extra:
        lines.append("speedup@N: the same presets timed against all-fa at context N (same batch, same run), "
                     "although they were optimised for the first context.")
    if gpu:
        lines.append(f"{gpu_head}: the same presets on the {GPU_SETTING['profile']} device profile "
                     "(supernet/placement/profiles), a prediction of the analytic model, not measured here.")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c = r["counts"]
        predicted = float(r.get("predicted_speedup") or 1.0)
        cells = [r["preset"], f"{c['fa']}/{c['swa']}/{c['gdn']}/{c['kda']}", _speedup_cell(r),
                 f"{predicted:.2f}x", f"{r['decode_speedup'] / predicted:.2f}"]
        cells += [_context_cell(r, c) for c in extra]
        cells += [f"{gpu[r['preset']]:.2f}x"] if gpu else []
        cells += [f"{r['quality']:.4f}", f"{100 * r['quality_retention']:.1f}%", f"{100 * r['top1_agreement']:.1f}%"]
        cells += [f"{100 * r['needle'][k]:.0f}%" for k in needle_keys]
        if task_info:
            t = r["tasks"]
            cells += [f"{100 * t['retrieval_by_length'][str(n)]:.0f}%" for n in lengths]
            cells += [_pct(t.get("retrieval_retention")), f"{t['dev_tasks']:.3f}", _pct(t.get("dev_tasks_retention")),
                      f"{t['heldout_tasks']:.3f}", _pct(t.get("heldout_tasks_retention"))]
        lines.append("| " + " | ".join(cells) + " |")
    agree = agreement(measurements)
    if agree["worst"]:
        w = agree["worst"]
        verdict = "yes" if agree["all_within"] else "NO"
        lines += ["", f"Measured within {100 * AGREEMENT:.0f}% of predicted for every preset: {verdict} (largest gap: "
                      f"`{w['preset']}`, measured {w['measured']:.2f}x against {w['predicted']:.2f}x predicted, "
                      f"{100 * w['error']:+.1f}%)."]
    spec = measurements.get("speculative", {}).get("best")
    if spec:
        lines.append("")
        lines.append(f"Self-speculative decoding, best pair: draft `{spec['draft']}` -> target `{spec['target']}` "
                     f"(k={spec['k']}): {spec['speedup']:.2f}x over the target alone, acceptance "
                     f"{100 * spec['acceptance_rate']:.0f}%, output identical: {spec['lossless']}.")
    if task_info:
        lines += task_lines(measurements)
    return "\n".join(lines) + "\n"


def summary_markdown(measurements: dict) -> str:
    """The README's narrow table: speed at each context (predicted beside the first), KL retention,
    top-1, needle at the longest context, retrieval per length and task retention."""
    rows = measurements["presets"]
    main = str(measurements.get("settings", {}).get("throughput_context"))
    extra = extra_contexts(measurements)
    needle = list(rows[0]["needle"])[-1:] if rows and rows[0].get("needle") else []
    info = measurements.get("task_set")
    lengths = sorted(int(n) for n in info["retrieval_lengths"]) if info else []
    head = ["preset", "fa/swa/gdn/kda", f"speed @{length_tag(int(main))} (predicted)"]
    head += [f"speed @{length_tag(int(c))}" for c in extra] + ["KL retention", "top-1"]
    head += [f"needle@{length_tag(int(k))}" for k in needle]
    if info:
        head += ["retrieval " + "/".join(length_tag(n) for n in lengths), "retrieval retention", "dev retention",
                 "held-out retention"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "same_as" in r:
            continue
        c = r["counts"]
        cells = [r["preset"], f"{c['fa']}/{c['swa']}/{c['gdn']}/{c['kda']}",
                 f"{r['decode_speedup']:.2f}x ({float(r.get('predicted_speedup') or 1.0):.2f}x)"]
        cells += [f"{r['speed_by_context'][k]['speedup']:.2f}x" if "speedup" in r["speed_by_context"].get(k, {})
                  else "failed" for k in extra]
        cells += [f"{100 * r['quality_retention']:.1f}%", f"{100 * r['top1_agreement']:.1f}%"]
        cells += [f"{100 * r['needle'][k]:.0f}%" for k in needle]
        if info:
            t = r["tasks"]
            cells += ["/".join(f"{100 * t['retrieval_by_length'][str(n)]:.0f}" for n in lengths) + "%",
                      _pct(t.get("retrieval_retention")), _pct(t.get("dev_tasks_retention")),
                      _pct(t.get("heldout_tasks_retention"))]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def surrogate_quality(evaluations: Path) -> dict:
    """How well one surrogate per metric ranks placements it was not fitted on (k-fold CV Spearman,
    R^2, RMSE), fitted on every evaluated placement; {} with fewer than 10."""
    from supernet.io_utils import read_jsonl
    from supernet.layout import Placement
    from supernet.placement.multimetric import fit_metric_surrogates, metric_columns

    rows = [r for _, r in read_jsonl(evaluations, "evaluations file", "rerun the evaluate step")]
    metrics = [m for m in metric_columns(rows) if m in SURROGATE_METRICS]
    if len(rows) < 10 or not metrics:
        return {}
    fits = fit_metric_surrogates([Placement.parse(r["placement"]) for r in rows], rows, metrics)
    return {"placements": len(rows), "metrics": {m: {k: fits[m].diagnostics.get(k) for k in
                                                     ("cv_spearman", "cv_r2", "cv_rmse", "folds")} for m in metrics}}


def surrogate_lines(quality: dict) -> list[str]:
    if not quality:
        return []
    cells = [f"`{m}` {d['cv_spearman'] if d['cv_spearman'] is not None else float('nan'):.3f}"
             for m, d in quality["metrics"].items()]
    return ["", f"Surrogates, one per metric, fitted on the {quality['placements']} evaluated placements: held-out "
                f"(cross-validated) Spearman {', '.join(cells)}."]


SURROGATE_METRICS = ("quality", "top1_agreement", "retrieval", "dev_tasks")


def speculative_lines(spec: dict) -> list[str]:
    """The batched self-speculation table (the pipeline's speculative step, speculative.json)."""
    out = ["", f"Self-speculative decoding in the batched engine (CUDA graphs: {spec['cuda_graphs']}), target "
               f"`{spec['target']}`, context {spec['context']}, {spec['new_tokens']} new tokens per row, greedy; speedup = "
               "the target alone's time per step over the speculative time per generated token of a row:", "",
           "| batch | draft | k | acceptance | speedup | lossless rows | chosen by |", "|---|---|---|---|---|---|---|"]
    for batch, b in spec["batches"].items():
        pick = b.get("cost_model_pick") or {}
        best = b.get("best_measured") or {}
        for r in sorted(b["rows"], key=lambda r: -r["speedup"]):
            tags = [t for t, row in (("cost model", pick.get("measured")), ("best measured", best)) if row
                    and (row["draft"], row["k"]) == (r["draft"], r["k"])]
            out.append(f"| {batch} | `{r['draft']}` | {r['k']} | {100 * r['acceptance']:.0f}% | {r['speedup']:.2f}x | "
                       f"{r['lossless_rows']}/{batch} | {', '.join(tags)} |")
        if not b["rows"]:
            out.append(f"| {batch} | none: no preset measured >= 1.5x faster than the target | | | | | |")
        elif not pick:
            out.append(f"| {batch} | cost model: no draft is predicted to beat the target alone | | | | | |")
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def task_lines(measurements: dict) -> list[str]:
    """What the task columns mean, the teacher's scores with their errors, the requirement verdicts and
    the per-task table."""
    info, rows = measurements["task_set"], measurements["presets"]
    base = rows[0]["tasks"]
    chance = info["chance"]
    out = ["", f"Tasks (task set `{info['name']}`: {info['note']}). The first row, all-fa, is the teacher: its "
               "attention layers and shared weights are the teacher's, unchanged by distillation. Retention = the "
               "preset's accuracy / the teacher's on the same documents; retrieval = mean exact-match of the greedy "
               "answer over the retrieval tasks (the metric the requirement is on); dev = mean accuracy over the "
               "development tasks (the optimiser may use them), held-out = over the held-out tasks (never used to "
               "choose a preset); the documents scored per task are in the per-task table."]
    for key, names, label in (("retrieval", info["retrieval"], "retrieval"), ("dev_tasks", info["dev"], "dev tasks"),
                              ("heldout_tasks", info["heldout"], "held-out tasks")):
        if key not in base:
            continue
        mean_chance = sum(chance.get(n, 0.0) for n in names) / len(names)
        out.append(f"- Teacher {label}: {base[key]:.3f} ± {mean_standard_error(base, names):.3f} (standard error; "
                   f"chance {mean_chance:.3f}) over {', '.join(f'`{n}`' for n in names)}.")
    for r in rows:
        for check in r["tasks"].get("requirements_check", []):
            verdict = "kept" if check["met"] else "NOT kept"
            out.append(f"- Preset `{r['preset']}` was optimised under `{check['requirement']}`: measured "
                       f"{check['metric']} {check['measured']:.3f} against the bound {check['bound']:.3f} "
                       f"(teacher {check['teacher']:.3f}): requirement {verdict}.")
    out += ["", "Per task (accuracy; chance and documents in brackets):", "",
            "| task | split | " + " | ".join(r["preset"] for r in rows) + " |", "|" + "---|" * (len(rows) + 2)]
    split = {**{n: "retrieval" for n in info["retrieval"]}, **{n: "dev" for n in info["dev"]},
             **{n: "held-out" for n in info["heldout"]}}
    for name in info["retrieval"] + info["dev"] + info["heldout"]:
        n = base["task_n"].get(name, 0)
        cells = [f"`{name}` ({chance.get(name, 0.0):.2f}; {n})", split[name]]
        cells += [f"{r['tasks']['task_scores'][name]:.3f}" for r in rows]
        out.append("| " + " | ".join(cells) + " |")
    return out


def extra_contexts(measurements: dict) -> list[str]:
    """The contexts timed beside the main one (the rows' speed_by_context keys), in order."""
    rows = measurements["presets"]
    main = str(measurements.get("settings", {}).get("throughput_context"))
    keys = rows[0].get("speed_by_context", {}) if rows else {}
    return sorted((c for c in keys if c != main), key=int)


def _context_cell(row: dict, context: str) -> str:
    cell = row.get("speed_by_context", {}).get(context, {})
    if "speedup" not in cell:
        return "failed" if "error" in cell else "n/a"
    low, high = cell["speedup_range"]
    return f"{cell['speedup']:.2f}x ({low:.2f}-{high:.2f})" if row["preset"] != "all-fa" else f"{cell['speedup']:.2f}x"


def _speedup_cell(row: dict) -> str:
    """Measured speedup, with the range of its timed windows when the run recorded several."""
    cell = f"{row['decode_speedup']:.2f}x"
    low_high = row.get("decode_speedup_range")
    if low_high and len(row.get("ms_per_step_windows", [])) > 1 and row["preset"] != "all-fa":
        cell += f" ({low_high[0]:.2f}-{low_high[1]:.2f})"
    return cell


def plot(measurements: dict, evaluations: Path | None, out: Path) -> None:
    """Presets' measured speed vs retention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = measurements["presets"]
    main = measurements.get("settings", {}).get("throughput_context")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([r["decode_speedup"] for r in rows], [100 * r["quality_retention"] for r in rows], "o", color="C0",
            label=f"context {main}" if main else "presets (measured)")
    for r in rows:
        ax.annotate(r["preset"], (r["decode_speedup"], 100 * r["quality_retention"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    for i, c in enumerate(extra_contexts(measurements)):
        pts = [(r["speed_by_context"][c]["speedup"], 100 * r["quality_retention"]) for r in rows
               if "speedup" in r.get("speed_by_context", {}).get(c, {})]
        if pts:
            ax.plot(*zip(*pts), "s", color=f"C{i + 1}", label=f"context {c}")
    if extra_contexts(measurements):
        ax.set_xscale("log")
    ax.set_xlabel("decode throughput vs all-fa (measured)")
    ax.set_ylabel("quality retention (% of all-fa, 1 - normalised KL)")
    ax.set_title("supernet presets: speed vs quality")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def write_report(workdir: Path) -> Path:
    measurements = json.loads((workdir / "measurements.json").read_text())
    presets = workdir / "presets.json"
    source = json.loads(presets.read_text()).get("cost_source") if presets.exists() else None
    config_file = workdir / "supernet-final" / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else None
    md = table_markdown(measurements, source, gpu_predictions(measurements, config))
    if (workdir / "evaluations.jsonl").exists():
        quality = surrogate_quality(workdir / "evaluations.jsonl")
        (workdir / "surrogates.json").write_text(json.dumps(quality, indent=2) + "\n")
        md += "\n".join(surrogate_lines(quality)) + "\n"
    spec = workdir / "speculative.json"
    if spec.exists():
        md += "\n".join(speculative_lines(json.loads(spec.read_text()))) + "\n"
    (workdir / "results.md").write_text(md)
    (workdir / "summary.md").write_text(summary_markdown(measurements))
    plot(measurements, workdir / "evaluations.jsonl", workdir / "speed_quality.png")
    print(md)
    return workdir / "results.md"
