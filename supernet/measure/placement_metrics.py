"""Task metrics per placement: a retrieval score, a development-task score and (reports only) a
held-out-task score.

The tasks are loaded once (lm-eval task objects over our local files) and re-scored for each placement
with lm-eval's `evaluate`, so each placement costs only its forwards. With a small `limit` (a few
documents per task) this adds seconds per placement on a GPU, which keeps a few hundred placements
inside one allocation. `eval-placements` never scores held-out tasks (they are refused as `dev`);
the pipeline's report passes them as `heldout`, so they are measured per preset and never optimised on.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Mapping, Sequence

from supernet.layout import Placement
from supernet.measure import tasks as T


class TaskMetrics:
    """Callable: placement -> {"retrieval": mean acc, "dev_tasks": mean acc, ["heldout_tasks": mean acc],
    "task_scores": {task: acc}, "task_n": {task: documents scored}}."""

    def __init__(self, model: Any, tokenizer: Any, retrieval: Sequence[str] = (), dev: Sequence[str] = (),
                 limit: int | None | Mapping[str, int | None] = 4, batch_tokens: int = 8192,
                 corpus: str | None = None, log=print, heldout: Sequence[str] = ()) -> None:
        """`limit`: documents per task (None: all), or a mapping task -> documents for per-task limits."""
        from lm_eval.tasks import TaskManager, get_task_dict

        from supernet.measure.lm_eval_model import SupernetLM

        held = [n for n in dev if T.registry().get(n) is not None and T.registry()[n].split == "heldout"]
        if held:
            raise T.TaskError(f"{', '.join(held)} are held-out tasks (only reported); optimise on dev tasks")
        self.retrieval, self.dev, self.heldout = list(retrieval), list(dev), list(heldout)
        names = list(dict.fromkeys(self.retrieval + self.dev + self.heldout))
        self.limit = dict(limit) if isinstance(limit, Mapping) else (None if limit is None else int(limit))
        if not names:
            raise T.TaskError("no task metrics requested")
        self.lm = SupernetLM(model, tokenizer, "all-fa", batch_tokens=batch_tokens, progress=False)
        root, self.chance = T.prepare(names, tokenizer, corpus, log)
        reg = T.registry()
        self.lengths = {n: reg[n].length for n in self.retrieval if n in reg}  # tokens of each retrieval task
        self.task_dict = get_task_dict(names, TaskManager(include_path=[str(root)], include_defaults=False))
        self.names = names
        self.samples = None  # per-task limits: the first N documents of each task, by lm-eval's `samples`
        if isinstance(self.limit, dict):
            self.samples = {}
            for n in names:
                cap = self.limit.get(n)
                if cap is not None:
                    total = sum(1 for _ in (root / f"{n}.jsonl").open())
                    self.samples[n] = list(range(min(int(cap), total)))
        self.chance = {n: self._chance_scored(root / f"{n}.jsonl", n, c) for n, c in self.chance.items()}
        self.spec = f"retrieval={','.join(self.retrieval)};dev={','.join(self.dev)};limit={self.limit}"
        if self.heldout:
            self.spec += f";heldout={','.join(self.heldout)}"

    def _chance_scored(self, data, name: str, whole: float) -> float:
        """Chance accuracy on the documents actually scored (the first N under a limit)."""
        cap = self.limit.get(name) if isinstance(self.limit, dict) else self.limit
        if cap is None:
            return whole
        with data.open() as fh:
            rows = [json.loads(line) for line, _ in zip(fh, range(int(cap)))]
        if not rows or "choices" not in rows[0]:  # retrieval: chance 0 whatever the documents
            return whole
        return sum(1 / len(r["choices"]) for r in rows) / len(rows)

    def __call__(self, placement: Placement) -> dict:
        from lm_eval.evaluator import evaluate

        self.lm.placement = self.lm.model.config.resolve(placement)
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        res = evaluate(self.lm, self.task_dict, limit=None if self.samples is not None else self.limit,
                       samples=self.samples, bootstrap_iters=0, log_samples=False, verbosity="ERROR")
        scores = T.summarise(res, self.names)
        counts = {n: int(res.get("n-samples", {}).get(n, {}).get("effective", 0)) for n in self.names}
        out: dict = {"task_scores": scores, "task_n": counts, "tasks_spec": self.spec}
        for key, names in (("retrieval", self.retrieval), ("dev_tasks", self.dev), ("heldout_tasks", self.heldout)):
            if names:
                out[key] = sum(scores[n] for n in names) / len(names)
        return out


class PlacementScorer:
    """What `eval-placements` measures per placement (KL quality, top-1 and the task metrics), as one
    callable with the probe that identifies how it measures (metric, reference, data, tasks).

    Built in one place so that the pipeline's verification of a constrained preset measures a candidate
    exactly as the evaluations it appends to were measured (evaluations.jsonl refuses other rows).
    """

    def __init__(self, evaluator: Any, model: Any, tokenizer: Any, metrics: TaskMetrics | None) -> None:
        self.evaluator, self.model, self.tokenizer, self.metrics = evaluator, model, tokenizer, metrics
        self.probe = {"metric": evaluator.metric, "reference": evaluator.reference, "data_id": evaluator.data_id}
        if metrics is not None:
            self.probe["tasks_spec"] = metrics.spec
        self.records_retrieval = bool(metrics is not None and metrics.retrieval)

    def __call__(self, placement: Placement) -> dict:
        row = self.evaluator(placement)
        if self.metrics is not None:
            row.update(self.metrics(placement))
        return row


def build_placement_scorer(ckpt, data, seq_len: int = 256, sequences: int = 16, top_k: int = 64,
                           batch_size: int = 4, teacher: str | None = None, gguf_file: str | None = None,
                           device: str | None = None, task_set: str | None = None, retrieval: str | None = None,
                           dev_tasks: str | None = None, task_limit: int | None = None, log=print) -> PlacementScorer:
    """The scorer of `eval-placements` with these options (see its --help); bad options raise T.TaskError."""
    from supernet.measure.quality import build_evaluator

    if task_set is not None and (retrieval or dev_tasks):
        raise T.TaskError("give --task-set or --retrieval/--dev-tasks, not both")
    evaluator, model = build_evaluator(ckpt, data, seq_len, sequences, top_k, batch_size, teacher, gguf_file, device)
    if not (retrieval or dev_tasks or task_set):
        return PlacementScorer(evaluator, model, None, None)
    if task_set is not None:
        from supernet.measure.task_sets import task_set as named_set

        chosen = named_set(task_set)
        retrieval_names = chosen.retrieval_tasks()
        dev_names = chosen.dev_tasks() if chosen.optimise_dev else []
        limit = chosen.placement_limit if task_limit is None else task_limit
    else:
        retrieval_names = T.expand(retrieval) if retrieval else []
        dev_names = T.expand(dev_tasks) if dev_tasks else []
        limit = 4 if task_limit is None else task_limit
    if limit < 1:
        raise T.TaskError("--task-limit must be >= 1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    metrics = TaskMetrics(model, tokenizer, retrieval_names, dev_names, limit, log=log)
    return PlacementScorer(evaluator, model, tokenizer, metrics)
