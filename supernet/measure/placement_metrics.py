"""Task metrics per placement for `eval-placements`: a retrieval score and a development-task score.

The tasks are loaded once (lm-eval task objects over our local files) and re-scored for each placement
with lm-eval's `evaluate`, so each placement costs only its forwards. With a small `limit` (a few
documents per task) this adds seconds per placement on a GPU, which keeps a few hundred placements
inside one allocation. Held-out tasks are never scored here: they are only reported (`eval-tasks`).
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from supernet.layout import Placement
from supernet.measure import tasks as T


class TaskMetrics:
    """Callable: placement -> {"retrieval": mean acc, "dev_tasks": mean acc, "task_scores": {task: acc}}."""

    def __init__(self, model: Any, tokenizer: Any, retrieval: Sequence[str] = (), dev: Sequence[str] = (),
                 limit: int = 4, batch_tokens: int = 8192, corpus: str | None = None, log=print) -> None:
        from lm_eval.tasks import TaskManager, get_task_dict

        from supernet.measure.lm_eval_model import SupernetLM

        held = [n for n in dev if T.registry().get(n) is not None and T.registry()[n].split == "heldout"]
        if held:
            raise T.TaskError(f"{', '.join(held)} are held-out tasks (only reported); optimise on dev tasks")
        self.retrieval, self.dev, self.limit = list(retrieval), list(dev), int(limit)
        names = self.retrieval + [n for n in self.dev if n not in self.retrieval]
        if not names:
            raise T.TaskError("no task metrics requested")
        self.lm = SupernetLM(model, tokenizer, "all-fa", batch_tokens=batch_tokens, progress=False)
        root, _ = T.prepare(names, tokenizer, corpus, log)
        self.task_dict = get_task_dict(names, TaskManager(include_path=[str(root)], include_defaults=False))
        self.spec = f"retrieval={','.join(self.retrieval)};dev={','.join(self.dev)};limit={self.limit}"

    def __call__(self, placement: Placement) -> dict:
        from lm_eval.evaluator import evaluate

        self.lm.placement = self.lm.model.config.resolve(placement)
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        res = evaluate(self.lm, self.task_dict, limit=self.limit, bootstrap_iters=0, log_samples=False,
                       verbosity="ERROR")
        scores = T.summarise(res, self.retrieval + self.dev)
        out: dict = {"task_scores": scores, "tasks_spec": self.spec}
        if self.retrieval:
            out["retrieval"] = sum(scores[n] for n in self.retrieval) / len(self.retrieval)
        if self.dev:
            out["dev_tasks"] = sum(scores[n] for n in self.dev) / len(self.dev)
        return out


def with_task_metrics(evaluate, metrics: TaskMetrics):
    """An evaluator whose rows also carry the task metrics."""
    def run(placement: Placement) -> dict:
        row = evaluate(placement)
        row.update(metrics(placement))
        return row
    return run
