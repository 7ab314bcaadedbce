"""Are the carried wheels plus the GPU image's packages a complete environment for benchmarks/e2e.py?

    python benchmarks/gpu/e2e_wheels.py closure REPORT.json      # here: the packages to carry, from pip's
                                                                  # --report, stopping at the image's own
    python benchmarks/gpu/e2e_wheels.py check WHEEL_DIR           # here: every Requires-Dist of every wheel
                                                                  # names a carried wheel or an image package
    python benchmarks/gpu/e2e_wheels.py check WHEEL_DIR --installed   # there, after the install: also the
                                                                  # versions, read from the installed metadata

Why: the GPU machine has no package index, so a dependency forgotten here is an ImportError there,
minutes into a paid run. The image's package list (benchmarks/gpu/device-packages.txt, from KINDS.md)
has names only; the versions are checked on the machine itself (`--installed`).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.version import Version

HERE = Path(__file__).resolve().parent
# the GPU machine's interpreter: CPython 3.12.3 on x86-64 Linux
TARGET_ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
              "implementation_name": "cpython", "platform_python_implementation": "CPython",
              "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
              "os_name": "posix", "extra": ""}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def device_packages(path: Path = HERE / "device-packages.txt") -> set[str]:
    return {norm(line.strip()) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}


def applies(req: Requirement) -> bool:
    """A requirement of the base install (no extra) under the GPU machine's interpreter."""
    return req.marker is None or req.marker.evaluate(TARGET_ENV)


def closure(report: Path, roots: list[str]) -> dict[str, str]:
    """name -> version of what must be carried: the roots' dependency graph from pip's --report, not
    descending into packages the image already holds (they bring their own dependencies there)."""
    installs = {norm(i["metadata"]["name"]): i["metadata"] for i in json.loads(report.read_text())["install"]}
    have, out, stack = device_packages(), {}, [norm(r) for r in roots]
    while stack:
        name = stack.pop()
        if name in out or name in have:
            continue
        if name not in installs:
            sys.exit(f"{name} is not in {report}; resolve again with it among the requirements")
        out[name] = installs[name]["version"]
        stack += [norm(Requirement(r).name) for r in installs[name].get("requires_dist", []) if applies(Requirement(r))]
    return dict(sorted(out.items()))


def wheel_metadata(whl: Path) -> tuple[str, str, list[Requirement]]:
    with zipfile.ZipFile(whl) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = zf.read(meta).decode()
    field = lambda key: [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(key + ":")]
    return norm(field("Name")[0]), field("Version")[0], [Requirement(r) for r in field("Requires-Dist")]


def check(wheel_dir: Path, installed: bool) -> int:
    """Print each unmet requirement; the number of problems (0: complete)."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    carried: dict[str, str] = {}
    problems = 0
    metas = [wheel_metadata(w) for w in wheels]
    for name, version, _ in metas:
        if name in carried:
            print(f"two versions of {name}: {carried[name]} and {version} (keep one)")
            problems += 1
        carried[name] = version
    have = device_packages()
    if installed:
        import importlib.metadata as md

    for name, version, reqs in metas:
        for req in filter(applies, reqs):
            dep = norm(req.name)
            if dep in carried:
                found = carried[dep]
            elif installed:
                try:
                    found = md.version(req.name)
                except md.PackageNotFoundError:
                    found = None
            else:
                found = "image" if dep in have else None
            if found is None:
                print(f"MISSING  {name} {version} needs {req}: neither carried nor in the image")
                problems += 1
            elif found != "image" and req.specifier and not req.specifier.contains(Version(found), prereleases=True):
                print(f"VERSION  {name} {version} needs {req}, found {dep} {found}")
                problems += 1
    where = "installed versions" if installed else "the image's package names"
    print(f"{len(wheels)} wheels; every requirement met by the wheels and {where}" if not problems
          else f"{problems} problem(s) among {len(wheels)} wheels")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("closure")
    c.add_argument("report", type=Path)
    c.add_argument("--roots", default="lm-eval,fla-core,flash-linear-attention,gguf")
    k = sub.add_parser("check")
    k.add_argument("wheel_dir", type=Path)
    k.add_argument("--installed", action="store_true")
    args = ap.parse_args()
    if args.cmd == "closure":
        for name, version in closure(args.report, args.roots.split(",")).items():
            print(f"{name}=={version}")
    else:
        sys.exit(1 if check(args.wheel_dir, args.installed) else 0)


if __name__ == "__main__":
    main()
