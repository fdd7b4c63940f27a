"""Mutation score of the core pure modules, each against its own fast tests (mutmut 3).

    python benchmarks/mutation.py                       # every module of MODULES
    python benchmarks/mutation.py models/counts.py      # some of them
    python benchmarks/mutation.py --list-survivors      # and name the mutants that survived
    python benchmarks/mutation.py --summary             # the stored scores only, nothing run

For each module, the project's files (tracked and untracked, as in the working tree) are copied to a
scratch folder, mutmut mutates that one module, and each mutant runs the module's tests (only those
tests that reach the mutated function: mutmut's own test selection). The score is

    killed / (killed + survived)

where timeouts count as killed and mutants no test reaches ("no tests") count as survived. A mutant
judged equivalent (it cannot change any observable result) leaves the count only through EQUIVALENT,
with its written reason, and only while its diff still contains the mutated text recorded there (a
source edit renumbers mutants: a stale entry counts as survived and is reported).

Each module's result is stored in RESULTS (reports/mutation.json, git-ignored; a later run of the same
module replaces it), so the overall score adds up modules measured at different times:

    mutation_score: X  <module> (killed K, survived S, equivalent E, <seconds> s, <UTC time measured>)
    mutation_score_overall: X  (killed K of N, <m> of 9 modules[; not measured: ...])

Too slow for CI on 2 cores (minutes per module): it is run by hand and its figures go into the issue
notes. Target: >= 0.85 overall, >= 0.75 per module.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "reports" / "mutation.json"
"""Per-module results of the last run of each module (the overall score is computed from them)."""

MODULES: dict[str, tuple[str, ...]] = {
    "models/config.py": ("tests/models/test_config.py",),
    "models/counts.py": ("tests/models/test_counts.py",),
    "models/budget.py": ("tests/models/test_budget.py",),
    "trainers/loader.py": ("tests/trainers/test_loader.py",),
    "trainers/optim.py": ("tests/trainers/test_optim.py",),
    "trainers/checkpoint.py": ("tests/trainers/test_checkpoint.py",),
    "orchestrator/runkey.py": ("tests/orchestrator/test_runkey.py",),
    "analysis/extremum.py": ("tests/analysis/test_extremum.py",),
    "analysis/decode.py": ("tests/analysis/test_decode.py", "tests/analysis/test_main.py"),
}
"""Module -> the fast test files it is scored against."""

_NONE_IS_FALSE = "tests only the truth value of this flag: None behaves exactly as False"
_PANDAS_DROPNA = "pandas groupby(dropna=None) keeps NaN groups exactly as dropna=False (None is falsy there)"
_ZIP_STRICT = "the lengths were checked equal two lines above (AnalysisError), so zip's strict never fires"
_DEVICE_CASE = "analysis.devices.get_device looks names up case-insensitively: the same Device"
_ONE_DEVICE = "one device never synchronises (estimate: sync_s = 0 when gpus = 1), so the sync count is unused"
_TIED_NONE = "ModelConfig(tied=None) is falsy like tied=False: the same untied parameter count"
_DEFAULT_ARCH = "arch='llama' dropped: ModelConfig's default arch is llama"
_UNUSED_NAME = "the estimate's name is never read, only its times"
EQUIVALENT: dict[str, tuple[str, str]] = {
    # mutant name: (text of the mutated line, why it cannot change an observable result)
    "orchestrator.runkey.x_canonical_json__mutmut_4": ("allow_nan=None", "json.dumps " + _NONE_IS_FALSE),
    "trainers.optim.x_build_optimizer__mutmut_15": (
        "betas=(cfg.beta1, cfg.beta2), )", "eps dropped: torch.optim.AdamW's default eps is the same 1e-8"),
    "trainers.optim.x_param_groups__mutmut_4": ("recurse=None", "nn.Module.named_parameters " + _NONE_IS_FALSE),
    "trainers.optim.x_param_groups__mutmut_15": (
        "if (module_path) or True else name",
        "a root parameter's path becomes '.name': the extra empty part holds neither 'norm' nor an embedding "
        "fragment and parts[-2:] still holds the name, so _no_decay decides the same"),
    "trainers.checkpoint.x_capture_rng__mutmut_11": (
        "torch.tensor(py_state, dtype=None)", "torch.tensor infers int64 from Python ints: the same tensor"),
    "trainers.checkpoint.x_capture_rng__mutmut_13": (
        "torch.tensor(py_state, )", "torch.tensor infers int64 from Python ints: the same tensor"),
    "trainers.checkpoint.x_restore_rng__mutmut_18": (
        "astype(None), np_state",
        "float64 holds the 32-bit key words exactly and numpy.random.set_state casts them to uint32 itself"),
    "trainers.checkpoint.x__sha256__mutmut_8": ("f.read(None)", "reading the file at once: same bytes, same digest"),
    "trainers.checkpoint.x__sha256__mutmut_10": ("f.read(2 << 22)", "another chunk size: same bytes, same digest"),
    "trainers.checkpoint.x__sha256__mutmut_11": ("f.read(1 << 23)", "another chunk size: same bytes, same digest"),
    "analysis.extremum.x__select__mutmut_14": ("strict=None", _ZIP_STRICT),
    "analysis.extremum.x__select__mutmut_17": ("zip(by, wanted, )", _ZIP_STRICT),
    "analysis.extremum.x__select__mutmut_18": ("strict=False", _ZIP_STRICT),
    "analysis.extremum.x__select__mutmut_29": ("dropna=None", _PANDAS_DROPNA),
    "analysis.extremum.x_distances_within__mutmut_16": ("dropna=None", _PANDAS_DROPNA),
    "analysis.extremum.x_members__mutmut_12": ("dropna=None", _PANDAS_DROPNA),
    "analysis.extremum.x_step_stats__mutmut_29": ("dropna=None", _PANDAS_DROPNA),
    "analysis.extremum.x_extremum_distance__mutmut_45": (
        "join(parts[1], ).dropna()",
        "a left join keeps a's steps in a's order; the steps b lacks get NaN and the dropna() that follows "
        "removes them: the same rows, in the same order, as the inner join (steps are unique per group)"),
    "analysis.decode.x__section_3_4__mutmut_4": ('get_device("h100")', _DEVICE_CASE),
    "analysis.decode.x__section_3_4__mutmut_7": ('get_device("a100")', _DEVICE_CASE),
    "analysis.decode.x__section_4_2__mutmut_4": ('get_device("h100")', _DEVICE_CASE),
    "analysis.decode.x_speedup__mutmut_2": ('device: Device | str = "h100"', _DEVICE_CASE),
    "analysis.decode.x__section_3_4__mutmut_11": ("4096 / 1 * 4", "dividing by 1 gives the same number (a float)"),
    "analysis.decode.x__section_3_4__mutmut_184": ("128 / 1 * 256", "dividing by 1 gives the same number (a float)"),
    "analysis.decode.x__section_3_4__mutmut_22": ("decode_time(7e9 + kv, None, h100)", _ONE_DEVICE),
    "analysis.decode.x__section_3_4__mutmut_29": ("decode_time(7e9 + kv, 1, h100)", _ONE_DEVICE),
    "analysis.decode.x__section_3_4__mutmut_38": ("tied=None)", _TIED_NONE),
    "analysis.decode.x__section_6_7__mutmut_17": ("tied=None)", _TIED_NONE),
    "analysis.decode.x__section_3_4__mutmut_39": ("ModelConfig(vocab_size=32000", _DEFAULT_ARCH),
    "analysis.decode.x__section_6_7__mutmut_18": ("ModelConfig(vocab_size=32000", _DEFAULT_ARCH),
    "analysis.decode.x__section_6_7__mutmut_24": (
        "n_heads=32, tied=False)", "n_kv_heads=4 dropped: ModelConfig's default n_kv_heads is the same 4"),
    "analysis.decode.x__section_3_4__mutmut_195": ("estimate(None, nbytes", _UNUSED_NAME),
    "analysis.decode.x__section_3_4__mutmut_205": ('estimate("XXXX", nbytes', _UNUSED_NAME),
    "analysis.decode.x__section_4_2__mutmut_96": (
        "free_comm_length(12500001.0, h100)", "one byte more per layer: ceil(1.5599999) = ceil(1.56) = 2, the same"),
    "analysis.decode.x_figure_7__mutmut_2": (
        "max_syncs: int = 201", "default 201: step 201 // 100 = 2 and range(0, 202, 2) = range(0, 201, 2), the same"),
    "analysis.decode.x_figure_7__mutmut_31": ("squeeze=None", "matplotlib's Figure.subplots " + _NONE_IS_FALSE),
    "analysis.decode.x_decode_time__mutmut_2": ("estimate(None, nbytes", "decode_time returns step_s: " + _UNUSED_NAME),
    "analysis.decode.x_decode_time__mutmut_12": ('estimate("XXXX", nbytes', "decode_time returns step_s: " + _UNUSED_NAME),
    "analysis.decode.x_estimate_model__mutmut_12": (
        "gpus >= 1 and", "gpus = 1 adds the note only if lane_count % 1 != 0, which never holds"),
    "analysis.decode.x_decode_flops__mutmut_1": (
        "context: int = 1, batch", "max(context, 1) makes the default context 0 and 1 the same"),
}
"""mutmut mutant name -> (the mutated text its diff must still contain, why it cannot change an observable
result). Such mutants leave the count."""

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
        seconds = time.perf_counter() - start
        if run.returncode != 0:
            tail = (run.stderr.strip() or run.stdout.strip())[-600:]  # mutmut reports a failing clean run on stdout
            return {"module": module, "error": f"mutmut exit {run.returncode}: {tail}"}
        status = results(work, module)
        survivors = [n for n, v in status.items() if STATUSES.get(v) == "survived"]
        shown = {n: show(work, n) for n in survivors if diffs or n in EQUIVALENT}
    stale = sorted(n for n in survivors if n in EQUIVALENT and EQUIVALENT[n][0] not in shown[n])
    equivalent = sorted(n for n in survivors if n in EQUIVALENT and n not in stale)
    counted = {n: STATUSES.get(s, s) for n, s in status.items() if n not in equivalent}
    killed = sum(v == "killed" for v in counted.values())
    survived = sorted(n for n, v in counted.items() if v == "survived")
    other = sorted(f"{n} ({v})" for n, v in counted.items() if v not in ("killed", "survived"))
    return {"module": module, "killed": killed, "survived": survived, "equivalent": equivalent, "stale": stale,
            "other": other, "score": killed / (killed + len(survived)) if killed + len(survived) else None,
            "seconds": round(seconds, 1), "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "diffs": {n: d for n, d in shown.items() if diffs or n in stale}}


def load_results() -> dict[str, dict]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def store_result(result: dict) -> None:
    stored = load_results()
    stored[result["module"]] = {k: v for k, v in result.items() if k != "diffs"}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")


def module_line(r: dict) -> str:
    score = "nan" if r["score"] is None else f"{r['score']:.3f}"
    return (f"mutation_score: {score}  {r['module']} (killed {r['killed']}, survived {len(r['survived'])}, "
            f"equivalent {len(r['equivalent'])}, {r['seconds']:.0f} s, {r['measured']})")


def overall_line(stored: dict[str, dict]) -> str:
    done = [stored[m] for m in MODULES if m in stored]
    killed = sum(r["killed"] for r in done)
    n = killed + sum(len(r["survived"]) for r in done)
    missing = [m for m in MODULES if m not in stored]
    return (f"mutation_score_overall: {killed / n if n else float('nan'):.3f}  (killed {killed} of {n}, "
            f"{len(done)} of {len(MODULES)} modules" + (f"; not measured: {', '.join(missing)})" if missing else ")"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", help=f"modules to score (default: all of {list(MODULES)})")
    parser.add_argument("--children", type=int, default=2, help="parallel mutants (default: 2, the cores here)")
    parser.add_argument("--list-survivors", action="store_true",
                        help="print every surviving mutant with its diff")
    parser.add_argument("--summary", action="store_true", help=f"print the stored results ({RESULTS}) only")
    args = parser.parse_args()
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; allowed: {list(MODULES)}")
    if args.summary:
        stored = load_results()
        for module in args.modules or MODULES:
            print(module_line(stored[module]) if module in stored else f"mutation_score: -  {module} (not measured)")
        print(overall_line(stored))
        return
    failed = False
    for module in args.modules or MODULES:
        r = score_module(module, MODULES[module], args.children, args.list_survivors)
        if "error" in r:
            print(f"mutation_score: -  {module} (not measured: {r['error']})", flush=True)
            failed = True
            continue
        store_result(r)
        print(module_line(r), flush=True)
        for name in r["survived"] if args.list_survivors else []:
            print(f"  {name}\n" + "\n".join(f"      {line}" for line in r["diffs"].get(name, "").splitlines()))
        for name in r["stale"]:
            print(f"  {name}: stale EQUIVALENT entry (its diff no longer contains {EQUIVALENT[name][0]!r}), counted "
                  "as survived")
        for line in r["other"]:
            print(f"  {line}")
    print(overall_line(load_results()))
    if failed:
        raise SystemExit("some modules were not measured (above)")


if __name__ == "__main__":
    main()
