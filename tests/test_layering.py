"""The package's layering, checked: placement/ imports no torch, tests import no benchmark script."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_placement_module_imports_without_torch():
    """placement/ is numpy/scipy only, so `placement optimize` starts fast and runs without torch."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import supernet.placement as pkg\n"
        "names = [m.name for m in pkgutil.walk_packages(pkg.__path__, 'supernet.placement.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "    assert 'torch' not in sys.modules, name + ' imports torch'\n"
        "print(len(names))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip()) >= 8  # the walk found the modules (cost, evaluate, optimize, surrogate, ...)


def imports_anywhere(folder: str, modules: tuple[str, ...]) -> list[str]:
    """`file:line module` for every import of one of `modules` (or a submodule) in `folder`, at any depth
    of the code, deferred imports inside functions included."""
    found = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names
                      if any(n == m or n.startswith(m + ".") for m in modules)]
    return found


def test_no_placement_module_imports_torch_even_inside_a_function():
    """Timing with torch lives in supernet.measure (e.g. measure/costs.py), not behind a deferred import
    in placement/: the optimiser's package must stay runnable where torch is not installed."""
    torch_side = ("torch", "transformers", "supernet.model", "supernet.cache", "supernet.static_decode",
                  "supernet.measure", "supernet.generation", "supernet.speculative")
    offenders = imports_anywhere("placement", torch_side)
    assert not offenders, offenders


def test_serving_holds_no_reference_engine():
    """serving/ is vLLM only: greedy and speculative generation of our own engine (and their one-row
    forms) live in supernet.generation / supernet.speculative, measuring in supernet.measure."""
    engine = ("supernet.generation", "supernet.speculative", "supernet.measure", "supernet.draft_choice")
    offenders = imports_anywhere("serving", engine)
    assert not offenders, offenders


def test_no_test_imports_a_benchmark_script():
    """Reusable measuring code lives in supernet.measure; benchmarks/ holds scripts, run as scripts."""
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] == "benchmarks"]
    assert not offenders, offenders


def test_every_package_folder_is_listed_for_installation():
    """A non-editable install ships only the packages pyproject.toml lists: a new subpackage left out
    of the list works in a checkout and fails after `pip install .`."""
    import tomllib

    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    found = set()
    for package, folder in setup["package-dir"].items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([package, *rel.parts]))
    assert found - listed == set(), f"add to [tool.setuptools] packages: {sorted(found - listed)}"
