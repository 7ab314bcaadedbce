"""Task sets: which tasks a run scores, at which lengths and with how many documents, in one place.

The split of BIG-bench tasks into development and held-out lives in the task registry (tasks.py:
DEV_TASKS, HELDOUT_TASKS); a task set picks from it by group and adds what depends on the setting:
the retrieval lengths a device can afford, the documents per task when `eval-placements` scores each
placement (optimisation) and when the pipeline's report scores each preset. `eval-placements
--task-set NAME`, `supernet demo` (set `demo`) and benchmarks/e2e.py (set `e2e`) all read it from here.

Development tasks (and retrieval) may steer the optimiser; held-out tasks are only ever reported, so
a preset tuned on tasks is still judged on tasks it never saw.
"""
from __future__ import annotations

from dataclasses import dataclass

from supernet.measure import tasks as T


@dataclass(frozen=True)
class TaskSet:
    name: str
    retrieval: tuple[str, ...]  # tasks or groups: the retrieval score (optimisation and report)
    dev: tuple[str, ...]        # development tasks: the optimiser may use their score
    heldout: tuple[str, ...]    # held-out tasks: reported only
    placement_limit: int        # documents per task per placement in eval-placements
    report_docs: int | None     # retrieval documents per task per preset in the report (None: all)
    report_examples: int | None  # BIG-bench examples per task per preset in the report (None: all)
    optimise_dev: bool = True   # eval-placements also scores the development tasks
    note: str = ""              # why these lengths and limits

    def retrieval_tasks(self) -> list[str]:
        return T.expand(self.retrieval) if self.retrieval else []

    def dev_tasks(self) -> list[str]:
        return T.expand(self.dev) if self.dev else []

    def heldout_tasks(self) -> list[str]:
        names = T.expand(self.heldout) if self.heldout else []
        reg = T.registry()
        wrong = [n for n in names if n in reg and reg[n].split != "heldout"]
        if wrong:
            raise T.TaskError(f"task set {self.name!r} lists {', '.join(wrong)} as held-out, but the registry "
                              "makes them development tasks")
        return names

    def report_limits(self) -> dict[str, int | None]:
        """Documents per task when the report scores a preset."""
        out: dict[str, int | None] = {n: self.report_docs for n in self.retrieval_tasks()}
        out.update({n: self.report_examples for n in self.dev_tasks() + self.heldout_tasks()})
        return out

    def retrieval_lengths(self) -> dict[int, list[str]]:
        """Retrieval tasks by length in tokens (the report's retrieval@length columns)."""
        out: dict[int, list[str]] = {}
        for n in self.retrieval_tasks():
            out.setdefault(T.registry()[n].length, []).append(n)
        return dict(sorted(out.items()))


TASK_SETS: dict[str, TaskSet] = {
    # The CPU demo, priced for minutes on 2 shared cores (SmolLM2 forwards a few hundred tokens a second
    # there): retrieval at 256 and 512 tokens, 4x and 8x the demo's 64-token SWA window (an 8K prompt
    # takes minutes); niah and multikey (the teacher scores 0 on variable tracking even at 2K). Each
    # placement is probed on the first document of each retrieval task, each preset on 5 per task
    # and on 12 examples of every development and held-out task.
    "demo": TaskSet("demo", retrieval=("ruler_niah_256", "ruler_multikey_256", "ruler_niah_512", "ruler_multikey_512"),
                    dev=("dev",), heldout=("heldout",), placement_limit=1, report_docs=5, report_examples=12,
                    optimise_dev=False,
                    note="retrieval at 256 and 512 tokens only, since the CPU cannot score 8K prompts in the demo's "
                         "minutes; niah and multikey; 5 documents per retrieval task and 12 examples per BIG-bench "
                         "task per preset, 1 retrieval document per task per evaluated placement"),
    # The GPU e2e run: RULER-style retrieval at 2K, 4K and 8K, every document of every task in the report.
    "e2e": TaskSet("e2e", retrieval=("retrieval_2k", "retrieval_4k", "retrieval_8k"), dev=("dev",),
                   heldout=("heldout",), placement_limit=4, report_docs=None, report_examples=None,
                   note="retrieval at 2K, 4K and 8K (niah, multikey, vartrack); every document and example "
                        "in the report, 4 per task per evaluated placement"),
}


def task_set(name: str) -> TaskSet:
    if name not in TASK_SETS:
        raise T.TaskError(f"unknown task set {name!r}; use one of {', '.join(TASK_SETS)}")
    return TASK_SETS[name]
