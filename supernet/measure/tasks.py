"""Our benchmark tasks for lm-evaluation-harness, written as local YAML + jsonl (there is no hub access).

Two families:
- BIG-bench multiple-choice tasks (`bb_<task>`), data from PyPI's `bigbench` sdist (see bigbench.py),
  scored by log-likelihood of each choice (lm-eval's `acc` and `acc_norm`). They are split, as Super
  Apriel does, into *development* tasks (the optimiser may look at them) and *held-out* tasks (only
  reported), so a preset tuned on tasks is still judged on tasks it never saw.
- Long-context retrieval (`ruler_<kind>_<256|512|1k|2k|4k|8k>`), generated locally (see retrieval.py).

Groups accepted wherever task names are: `dev`, `heldout`, `bigbench` (both), `retrieval`,
`retrieval_256` / `_512` / `_1k` / `_2k` / `_4k` / `_8k`.
Which of them a run scores (and how many documents) is a task set: task_sets.py.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from supernet.measure import bigbench, retrieval
from supernet.teacher import cache_dir

# BIG-bench tasks on which SmolLM2-135M-Instruct scores clearly above chance (accuracy / chance):
# general_knowledge 0.449/0.144 (n 69), riddle_sense 0.327/0.200 (n 49), human_organs_senses 0.429/0.250
# (n 42), measured on all examples (README); phrase_relatedness 0.517/0.250 (n 60), movie_recommendation
# 0.567/0.250 (n 60), similarities_abstraction 0.553/0.239 (n 38), measured on examples the screen that
# picked them never saw (benchmarks/screen_bigbench.py -> benchmarks/results/bigbench_screen.json, which
# lists every task tried). The screen's passes were split in the order it found them: first held-out,
# then dev, alternately, so that neither side is the better-looking one by choice.
DEV_TASKS = ("general_knowledge", "riddle_sense", "movie_recommendation")
HELDOUT_TASKS = ("human_organs_senses", "phrase_relatedness", "similarities_abstraction")
# 256 and 512: the CPU demo's lengths (supernet/measure/task_sets.py); 1K-8K: the GPU runs'.
RETRIEVAL_LENGTHS = {"256": 256, "512": 512, "1k": 1024, "2k": 2048, "4k": 4096, "8k": 8192}
RETRIEVAL_DOCS = 10
# The retrieval documents end this many tokens short of the length: room for the answer tokens.
ANSWER_ROOM = 16


class TaskError(ValueError):
    """Bad task input (an unknown name, a missing corpus); the message says what to use instead."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    family: str           # "bigbench" | "retrieval"
    split: str            # "dev" | "heldout" | "retrieval"
    source: str           # BIG-bench task name, or retrieval kind
    length: int = 0       # retrieval length in tokens


def registry() -> dict[str, TaskSpec]:
    specs = [TaskSpec(f"bb_{t}", "bigbench", "dev", t) for t in DEV_TASKS]
    specs += [TaskSpec(f"bb_{t}", "bigbench", "heldout", t) for t in HELDOUT_TASKS]
    specs += [TaskSpec(f"ruler_{k}_{tag}", "retrieval", "retrieval", k, n)
              for tag, n in RETRIEVAL_LENGTHS.items() for k in retrieval.KINDS]
    return {s.name: s for s in specs}


def groups() -> dict[str, list[str]]:
    reg = registry().values()
    out = {"dev": [s.name for s in reg if s.split == "dev"], "heldout": [s.name for s in reg if s.split == "heldout"],
           "retrieval": [s.name for s in reg if s.family == "retrieval"]}
    out["bigbench"] = out["dev"] + out["heldout"]
    for tag in RETRIEVAL_LENGTHS:
        out[f"retrieval_{tag}"] = [n for n in out["retrieval"] if n.endswith(f"_{tag}")]
    return out


def expand(names: str | Iterable[str], extra: Iterable[str] = ()) -> list[str]:
    """Task names from a comma list of names and groups; `extra` are names found under --include-path."""
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if not items:
        raise TaskError("no tasks given; pass --tasks with names such as dev, retrieval_2k or bb_general_knowledge")
    reg, grp, extra = registry(), groups(), set(extra)
    out: list[str] = []
    for item in items:
        if item in grp:
            out += grp[item]
        elif item in reg or item in extra:
            out.append(item)
        else:
            raise TaskError(f"unknown task {item!r}; use one of the groups {', '.join(sorted(grp))}, a task such as "
                            f"{', '.join(list(reg)[:3])} (all: `supernet eval-tasks --list`), or a YAML task "
                            "under --include-path")
    return list(dict.fromkeys(out))


def default_corpus() -> Path:
    """The retrieval haystack: pydocs-eval.jsonl in $SUPERNET_DATA, ../shared/data or ./data (as the demo)."""
    repo = Path(__file__).resolve().parents[2]
    for base in (os.environ.get("SUPERNET_DATA"), repo.parent / "shared" / "data", Path.cwd() / "data"):
        if base and (Path(base) / "pydocs-eval.jsonl").exists():
            return Path(base) / "pydocs-eval.jsonl"
    return Path(os.environ.get("SUPERNET_DATA") or repo.parent / "shared" / "data") / "pydocs-eval.jsonl"


def _tokenizer_id(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items())[:5000]) + str(len(vocab))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _yaml(spec: TaskSpec, data: Path) -> str:
    head = (f"task: {spec.name}\ntag: [supernet_{spec.split}]\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\ntest_split: test\n")
    if spec.family == "bigbench":
        return head + ("output_type: multiple_choice\ndoc_to_text: \"{{input}}\"\ndoc_to_choice: \"{{choices}}\"\n"
                       "doc_to_target: \"{{label}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
                       f"metadata:\n  version: 1.0\n  source: BIG-bench {spec.source} ({bigbench.BIGBENCH_PACKAGE})\n")
    return head + ("output_type: loglikelihood\ndoc_to_text: \"{{context}}\"\ndoc_to_target: \"{{answer}}\"\n"
                   "target_delimiter: \"\"\nmetric_list:\n  - metric: acc\n"
                   f"metadata:\n  version: 1.0\n  source: supernet retrieval {spec.source} at {spec.length} tokens\n")


def bigbench_spec(task: str, split: str = "screen") -> TaskSpec:
    """A BIG-bench task outside the registry (`bb_<task>`): how candidates are screened before joining it."""
    return TaskSpec(f"bb_{task}", "bigbench", split, task)


def prepare(names: Sequence[str], tokenizer=None, corpus: str | Path | None = None, log=print,
            extra: dict[str, TaskSpec] | None = None) -> tuple[Path, dict]:
    """Write the YAML + jsonl of our tasks among `names` under the cache; returns (include dir, chance per task).

    BIG-bench files are shared by all models; retrieval files depend on the tokenizer and the corpus,
    so they live in a folder named by both. `extra` adds specs outside the registry (screening).
    """
    reg = {**registry(), **(extra or {})}
    ours = [reg[n] for n in names if n in reg]
    chance: dict[str, float] = {}
    needs_tok = any(s.family == "retrieval" for s in ours)
    corpus = Path(corpus) if corpus else default_corpus()
    tag = "bigbench"
    if needs_tok:
        if tokenizer is None:
            raise TaskError("retrieval tasks need the model's tokenizer")
        if not corpus.exists():
            raise TaskError(f"retrieval haystack corpus {corpus} is missing; set SUPERNET_DATA or pass --corpus")
        tag = f"tok-{_tokenizer_id(tokenizer)}-{hashlib.sha256(str(corpus.resolve()).encode()).hexdigest()[:8]}"
    root = cache_dir() / "tasks" / tag
    root.mkdir(parents=True, exist_ok=True)
    texts: list[str] | None = None
    bigbench.fetch_bigbench_tasks([s.source for s in ours if s.family == "bigbench"
                                   and not (root / f"{s.name}.jsonl").exists()], log)
    for spec in ours:
        data = root / f"{spec.name}.jsonl"
        if spec.family == "bigbench":
            if not data.exists():
                bigbench.write_multiple_choice_jsonl(spec.source, data, log)
            rows = [json.loads(line) for line in data.open()]
            chance[spec.name] = sum(1 / len(r["choices"]) for r in rows) / len(rows)
        else:
            if not data.exists():
                if texts is None:
                    texts = [json.loads(line)["text"] for line in corpus.open()]
                rows = retrieval.make_rows(spec.source, spec.length - ANSWER_ROOM, tokenizer, texts, RETRIEVAL_DOCS)
                part = data.with_suffix(".part")
                part.write_text("".join(json.dumps(r) + "\n" for r in rows))
                os.replace(part, data)
            chance[spec.name] = 0.0
        (root / f"{spec.name}.yaml").write_text(_yaml(spec, data))
    return root, chance


def summarise(results: dict, names: Sequence[str]) -> dict[str, float]:
    """One accuracy per task from lm-eval's results (acc; acc_norm is in the full JSON)."""
    out = {}
    for n in names:
        r = results["results"].get(n, {})
        val = r.get("acc,none", r.get("exact_match,none"))
        if val is not None:
            out[n] = float(val)
    return out


def run_tasks(lm: Any, names: Sequence[str], limit: int | float | None = None, include_path: Sequence[str] = (),
              corpus: str | Path | None = None, log=print, extra: dict[str, TaskSpec] | None = None,
              **kwargs: Any) -> dict:
    """lm-eval's `simple_evaluate` on `names` (ours and any under `include_path`); lm-eval's results dict,
    with `supernet_chance` (chance accuracy per task of ours) added."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root, chance = prepare(names, getattr(lm, "tokenizer", None), corpus, log, extra)
    manager = TaskManager(include_path=[str(root), *map(str, include_path)], include_defaults=False)
    kwargs.setdefault("log_samples", False)
    kwargs.setdefault("bootstrap_iters", 0)
    results = simple_evaluate(model=lm, tasks=list(names), limit=limit, task_manager=manager, **kwargs)
    results["supernet_chance"] = chance
    return results


def include_path_tasks(include_path: Sequence[str]) -> list[str]:
    """Task names defined by YAML files under the user's --include-path folders."""
    if not include_path:
        return []
    from lm_eval.tasks import TaskManager

    return list(TaskManager(include_path=[str(p) for p in include_path], include_defaults=False).all_tasks)
