"""Ablation of the stage-1 recipe at an equal token budget (issue 17), CPU scale.

Arms, each from the same converted student, the same data order and the same number of training
tokens (steps x micro-batch x seq_len):
  e2e               N steps of end-to-end distillation (uniform placements, forward KL)
  transfer+e2e      N/2 steps of layer-local transfer (stage transfer), then N/2 steps of e2e
  e2e+act           N steps of e2e with the mixer-output activation loss (weight 0.8)
  transfer+e2e+act  N/2 transfer, then N/2 e2e with the activation loss
Held-out: KL(teacher || student) per token for all-swa, all-gdn, all-kda (and all-fa, which stays
the teacher), and retention = quality / quality(all-fa) with quality = 1 - KL / KL(teacher ||
uniform), as `supernet pipeline` reports it. Wall time per arm is reported too: a transfer step
trains every trainable mixer of every layer, so it costs more compute than an e2e step of the
same tokens.

Teacher: the tiny seeded Llama of training/testing.py (4 layers, hidden 64, byte vocabulary),
because the real SmolLM2-135M does not train for a meaningful number of steps in 15 minutes on
two shared CPU cores.

    .venv/bin/python -m benchmarks.bench_distill_recipe [--steps 600] [--seeds 0,1,2] [--out PATH]
Several seeds (data order, placements, conversion) show the spread; the table gives their mean.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import print_table, write_results

PLACEMENTS = ["all-fa", "all-swa", "all-gdn", "all-kda"]


def _config(world: Any, out: Path, steps: int, seed: int, **sections: Any):
    base: dict[str, Any] = dict(
        seed=seed,
        data={"seq_len": 64},
        sampling={"mixers": ["fa", "swa", "gdn", "kda"]},
        train={"max_steps": steps, "micro_batch_size": 4, "grad_accum": 1, "lr": 3e-3,
               "warmup_steps": max(1, steps // 10), "train_mixers": ["swa", "gdn", "kda"]},
        eval={"placements": PLACEMENTS, "num_sequences": 16, "batch_size": 8, "at_end": False},
        checkpoint={"every": 0, "save_final": True, "resume": "none"},
    )
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return world.config(out, **base)


def _uniform_kl(trainer) -> float:
    """Mean per-token KL(teacher || uniform) = log V - H(teacher) on the held-out windows."""
    from supernet.training.data import eval_indices

    ds, teacher = trainer.eval_ds, trainer.pair.teacher
    idx = eval_indices(len(ds), trainer.cfg.eval.num_sequences)
    total, count = 0.0, 0.0
    with torch.no_grad():
        for s in range(0, len(idx), 8):
            batch = ds.get(list(range(len(idx)))[s: s + 8])
            logp = torch.log_softmax(teacher(input_ids=batch.input_ids).logits.float(), -1)
            kl = math.log(logp.shape[-1]) + (logp.exp() * logp).sum(-1)
            total += float((kl * batch.mask).sum())
            count += float(batch.mask.sum())
    return total / count


def run_arm(world: Any, root: Path, name: str, steps: int, seed: int, transfer_steps: int,
            activation_weight: float) -> dict[str, Any]:
    from supernet.training.trainer import Trainer

    t0 = time.perf_counter()
    student = None
    if transfer_steps:
        tr = Trainer(_config(world, root / f"{name}-transfer", transfer_steps, seed, stage="transfer",
                             eval={"at_start": False}))
        student = str(tr.train().final_dir)
    e2e = steps - transfer_steps
    cfg = _config(world, root / name, e2e, seed, loss={"activation_weight": activation_weight},
                  eval={"at_start": False}, **({"student": {"path": student}} if student else {}))
    trainer = Trainer(cfg)
    trainer.train()
    kl = trainer.evaluate()
    n_tokens = steps * trainer.tokens_per_step
    return {"arm": name, "transfer_steps": transfer_steps, "e2e_steps": e2e, "activation_weight": activation_weight,
            "tokens": n_tokens, "wall_s": time.perf_counter() - t0, "held_out_kl": kl, "_trainer": trainer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps per arm (equal tokens)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; the table shows their mean")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/distill_recipe_cpu.json)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    from supernet.training.tiny import TinyWorld

    root = Path(tempfile.mkdtemp(prefix="bench-recipe-"))
    world = TinyWorld(root / "world", n_train=400, n_eval=40)
    n, half = args.steps, args.steps // 2
    seeds = [int(x) for x in args.seeds.split(",")]
    arms = [("e2e", 0, 0.0), ("transfer+e2e", half, 0.0), ("e2e+act", 0, 0.8), ("transfer+e2e+act", half, 0.8)]
    rows, kl_uniform = [], None
    t_start = time.perf_counter()
    for seed in seeds:
        for name, ts, aw in arms:
            print(f"[{time.perf_counter() - t_start:6.0f} s] seed {seed} arm {name}: {ts} transfer + {n - ts} e2e steps",
                  flush=True)
            r = run_arm(world, root / f"seed{seed}", name, n, seed, ts, aw)
            trainer = r.pop("_trainer")
            if kl_uniform is None:
                kl_uniform = _uniform_kl(trainer)
            r["seed"] = seed
            r["retention"] = {p: 1 - v / kl_uniform for p, v in r["held_out_kl"].items()}
            rows.append(r)

    def mean_kl(arm: str, p: str) -> float:
        vals = [r["held_out_kl"][p] for r in rows if r["arm"] == arm]
        return sum(vals) / len(vals)

    table = []
    for name, _, _ in arms:
        mine = [r for r in rows if r["arm"] == name]
        row = {"arm": name, "wall_s": round(sum(r["wall_s"] for r in mine) / len(mine), 1), "tokens": mine[0]["tokens"]}
        for p in PLACEMENTS[1:]:
            kl = mean_kl(name, p)
            row[f"{p} KL"] = kl
            row[f"{p} ret%"] = 100 * (1 - kl / kl_uniform)
            row[f"{p} KL/e2e"] = kl / mean_kl("e2e", p)
        table.append(row)
    cols = ["arm", "tokens", "wall_s"] + [f"{p} {k}" for p in PLACEMENTS[1:] for k in ("KL", "ret%", "KL/e2e")]
    print_table(table, cols, title=f"equal token budget ({n} steps x {rows[0]['tokens'] // n} tokens), mean of seeds "
                                   f"{seeds}; KL(teacher || uniform) = {kl_uniform:.4f}")
    per_seed = {}
    for seed in seeds:
        g = {r["arm"]: r["held_out_kl"]["all-gdn"] for r in rows if r["seed"] == seed}
        per_seed[seed] = (g["transfer+e2e"] - g["e2e"]) / g["e2e"]
    verdict = mean_kl("transfer+e2e", "all-gdn") / mean_kl("e2e", "all-gdn") - 1
    print(f"\nall-gdn held-out KL, transfer+e2e vs e2e: {100 * verdict:+.1f}% on the mean "
          f"({'better' if verdict < 0 else 'worse'}); per seed: "
          + ", ".join(f"{s}: {100 * v:+.1f}%" for s, v in per_seed.items()))
    write_results("distill_recipe_cpu", {
        "teacher": "tiny seeded Llama (training/testing.py: 4 layers, hidden 64, vocab 259)",
        "steps_per_arm": n, "tokens_per_step": rows[0]["tokens"] // n, "seeds": seeds,
        "seq_len": 64, "micro_batch_size": 4, "lr": 3e-3, "kl_teacher_uniform": kl_uniform,
        "arms": rows, "mean": table, "all_gdn_kl_change_transfer_vs_e2e": verdict,
        "all_gdn_kl_change_per_seed": {str(k): v for k, v in per_seed.items()},
        "total_wall_s": time.perf_counter() - t_start,
        "command": f"python -m benchmarks.bench_distill_recipe --steps {n} --seeds {args.seeds}",
    }, args.out)

if __name__ == "__main__":
    main()
