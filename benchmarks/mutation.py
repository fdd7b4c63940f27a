"""Mutation score of the core pure modules, each against its own fast tests (mutmut 3).

    python benchmarks/mutation.py                       # every module of MODULES
    python benchmarks/mutation.py models/counts.py      # some of them
    python benchmarks/mutation.py --list-survivors      # and name the mutants that survived

For each module, the project's files (tracked and untracked, as in the working tree) are copied to a
scratch folder, mutmut mutates that one module, and each mutant runs the module's tests (only those
tests that reach the mutated function: mutmut's own test selection). The score is

    killed / (killed + survived)

where timeouts count as killed and mutants no test reaches ("no tests") count as survived. A mutant
judged equivalent (it cannot change any observable result) leaves the count only through EQUIVALENT,
with its written reason. Too slow for CI on 2 cores (minutes per module): it is run by hand and its
figures go into the issue notes. Target: >= 0.85 overall, >= 0.75 per module.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODULES: dict[str, tuple[str, ...]] = {
    "models/config.py": ("tests/models/test_config.py",),
    "models/counts.py": ("tests/models/test_counts.py",),
    "models/budget.py": ("tests/models/test_budget.py",),
    "trainers/loader.py": ("tests/trainers/test_loader.py",),
    "trainers/optim.py": ("tests/trainers/test_optim.py",),
    "trainers/checkpoint.py": ("tests/trainers/test_checkpoint.py",),
    "orchestrator/runkey.py": ("tests/orchestrator/test_runkey.py",),
    "analysis/extremum.py": ("tests/analysis/test_extremum.py",),
    "analysis/decode.py": ("tests/analysis/test_decode.py",),
}
"""Module -> the fast test files it is scored against."""

EQUIVALENT: dict[str, str] = {}
"""mutmut mutant name -> why it cannot change an observable result. Such mutants leave the count."""

COPIED = ("models", "trainers", "analysis", "orchestrator", "hydra_plugins", "conf", "tests")
STATUSES = {"killed": "killed", "timeout": "killed", "survived": "survived", "no tests": "survived"}
"""mutmut's per-mutant result -> how the score counts it; other results (skipped, suspicious) are listed."""


def project_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.split()
    return [Path(p) for p in out if (ROOT / p).is_file()]


def scratch_copy(dest: Path) -> None:
    for rel in project_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)


def mutmut_section(module: str, tests: tuple[str, ...]) -> str:
    def toml_list(items) -> str:
        return "[" + ", ".join(json.dumps(i) for i in items) + "]"
    return (f"\n[tool.mutmut]\nsource_paths = {toml_list([module])}\n"
            f"also_copy = {toml_list(COPIED)}\n"
            f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
            'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x"]\n'
            'process_isolation = "forkserver"\n')


def results(work: Path, module: str) -> dict[str, str]:
    """mutant name -> mutmut's status, for the mutants of `module`."""
    proc = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work,
                          capture_output=True, text=True)
    prefix = module.removesuffix(".py").replace("/", ".") + "."
    found = {}
    for line in proc.stdout.splitlines():
        name, sep, status = line.strip().partition(": ")
        if sep and name.startswith(prefix):
            found[name] = status.strip()
    return found


def show(work: Path, name: str) -> str:
    """The mutant's diff, as `mutmut show` prints it (the changed lines only)."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=work, capture_output=True,
                         text=True).stdout
    return "\n".join(line for line in out.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---"))


def score_module(module: str, tests: tuple[str, ...], children: int, diffs: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="tpb-mutmut-") as tmp:
        work = Path(tmp)
        scratch_copy(work)
        with (work / "pyproject.toml").open("a") as f:
            f.write(mutmut_section(module, tests))
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(children)], cwd=work,
                             capture_output=True, text=True)
        if run.returncode != 0:
            return {"module": module, "error": f"mutmut exit {run.returncode}: {run.stderr.strip()[-600:]}"}
        status = results(work, module)
        shown = {n: show(work, n) for n, v in status.items() if STATUSES.get(v) == "survived"} if diffs else {}
    counted = {n: STATUSES.get(s, s) for n, s in status.items() if n not in EQUIVALENT}
    killed = sum(v == "killed" for v in counted.values())
    survived = sorted(n for n, v in counted.items() if v == "survived")
    other = sorted(f"{n} ({v})" for n, v in counted.items() if v not in ("killed", "survived"))
    return {"module": module, "killed": killed, "survived": survived, "other": other,
            "equivalent": sorted(n for n in status if n in EQUIVALENT), "seconds": time.perf_counter() - start,
            "diffs": shown}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", help=f"modules to score (default: all of {list(MODULES)})")
    parser.add_argument("--children", type=int, default=2, help="parallel mutants (default: 2, the cores here)")
    parser.add_argument("--list-survivors", action="store_true",
                        help="print every surviving mutant with its diff")
    args = parser.parse_args()
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; allowed: {list(MODULES)}")
    total_killed = total_survived = 0
    failed = False
    for module in args.modules or MODULES:
        r = score_module(module, MODULES[module], args.children, args.list_survivors)
        if "error" in r:
            print(f"mutation_score[{module}]: not measured ({r['error']})", flush=True)
            failed = True
            continue
        n = r["killed"] + len(r["survived"])
        total_killed, total_survived = total_killed + r["killed"], total_survived + len(r["survived"])
        print(f"mutation_score[{module}]: {r['killed'] / n if n else float('nan'):.3f}  "
              f"(killed {r['killed']}, survived {len(r['survived'])}, equivalent {len(r['equivalent'])}, "
              f"{r['seconds']:.0f} s)", flush=True)
        for name in r["survived"] if args.list_survivors else []:
            print(f"  {name}\n" + "\n".join(f"      {line}" for line in r["diffs"].get(name, "").splitlines()))
        for line in r["other"]:
            print(f"  {line}")
    n = total_killed + total_survived
    print(f"mutation_score: {total_killed / n if n else float('nan'):.3f}  (killed {total_killed} of {n})")
    if failed:
        raise SystemExit("some modules were not measured (above)")


if __name__ == "__main__":
    main()
