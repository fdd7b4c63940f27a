"""A real MLflow SQLite store filled with synthetic runs in the orchestrator's layout.

Experiments:
- lane_count: llama baseline (2 seeds), sandwich L1/L2/L4 and burger L1/L2 (2 seeds each, FINISHED),
  burger L4 with one FAILED and one KILLED run (a configuration with no finished run: "missing"),
  a third sandwich L4 seed still RUNNING at step 7. Finished runs log eval_loss at steps 10 and 20,
  equal to their train loss there.
- variance (no eval_loss logged: the default estimate is missing): llama and burger x cosine and wsd, 2 seeds each; the groups overlap up to step 5 and
  are separated from step 6 on (see VARIANCE_SEPARATION).
- speed_quality: an Optuna-like study, 4 trials tagged with their number, decode_speedup params, eval_loss.
- nothing_done: one FAILED run only.
- empty: an experiment without runs.
- resumed: one run with a step logged twice and a NaN step.
"""

from __future__ import annotations

import pytest

STEPS = 20
LANE_COUNT_FINAL = {
    # (label, arch, recipe, lane_count): (final loss seed 0, seed 1)
    ("llama-H64-n4", "llama", "", 1): (3.10, 3.20),
    ("sandwich-L1-d12-b1-c1", "tpb", "sandwich", 1): (3.15, 3.25),
    ("sandwich-L2-d12-b1-c1", "tpb", "sandwich", 2): (3.30, 3.40),
    ("sandwich-L4-d12-b1-c1", "tpb", "sandwich", 4): (3.50, 3.70),
    ("burger-L1-d12-b1-c1", "tpb", "burger", 1): (3.20, 3.22),
    ("burger-L2-d12-b1-c1", "tpb", "burger", 2): (3.60, 3.80),
}
VARIANCE_STEPS = 10
VARIANCE_SEPARATION = 6


def loss_curve(final: float, steps: int = STEPS) -> list[float]:
    """Decreasing linearly by 0.1 per step, exactly `final` at the last step."""
    return [final + 0.1 * (steps - s) for s in range(1, steps + 1)]


def variance_curve(arch: str, seed: int) -> list[float]:
    """llama seeds at 3.0 / 3.2 every step; burger at 3.1 / 3.3 up to step 5 (overlap), then 3.5 / 3.6."""
    if arch == "llama":
        return [3.0 + 0.2 * seed] * VARIANCE_STEPS
    return [3.1 + 0.2 * seed if s < VARIANCE_SEPARATION else 3.5 + 0.1 * seed for s in range(1, VARIANCE_STEPS + 1)]


def log_run(client, exp_id, name, params, tags, losses, status="FINISHED", extra=None, eval_every=None):
    """eval_every: also log eval_loss (equal to the train loss) every that many steps and at the last one."""
    from mlflow.entities import Metric, Param, RunTag

    run = client.create_run(exp_id, run_name=name)
    metrics = [Metric("train_loss", v, 1000 + s, s) for s, v in enumerate(losses, start=1)]
    if eval_every:
        metrics += [Metric("eval_loss", v, 1000 + s, s) for s, v in enumerate(losses, start=1)
                    if s % eval_every == 0 or s == len(losses)]
    for key, value in (extra or {}).items():
        metrics.append(Metric(key, value, 1000 + len(losses), len(losses)))
    client.log_batch(
        run.info.run_id,
        metrics=metrics,
        params=[Param(k, str(v)) for k, v in params.items()],
        tags=[RunTag(k, str(v)) for k, v in tags.items()],
    )
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def _arch_params(arch: str, recipe: str, lanes: int, depth: int = 12) -> dict:
    params = {"architecture.arch": arch, "architecture.hidden": 64, "architecture.n_layers": 4}
    if arch == "tpb":
        params |= {"architecture.recipe": recipe, "architecture.lane_count": lanes,
                   "architecture.lane_depth": depth, "architecture.tp_blocks": 1,
                   "architecture.n_classic_layers": 1, "lane_hidden": 64 // lanes if recipe == "sandwich" else 64}
    else:
        params |= {"architecture.recipe": "sandwich", "architecture.lane_count": 4,
                   "architecture.lane_depth": 3, "architecture.tp_blocks": 1,
                   "architecture.n_classic_layers": 1, "lane_hidden": 16}
    return params


def _common(seed: int, schedule: str = "cosine") -> dict:
    return {"protocol.seed": seed, "protocol.lr": 0.003, "protocol.schedule": schedule,
            "protocol.steps": STEPS, "protocol.batch_tokens": 4096, "protocol.threads": 1 + seed,
            "data.name": "stdlib", "budget": 100000}


def _fill_lane_count(client) -> None:
    exp = client.create_experiment("lane_count")
    for (label, arch, recipe, lanes), finals in LANE_COUNT_FINAL.items():
        for seed, final in enumerate(finals):
            params = _arch_params(arch, recipe, lanes) | _common(seed)
            params |= {"n_params": 100000 + lanes, "syncs": 3 if arch == "tpb" else 8,
                       "decode_speedup": 2.0 if arch == "tpb" else 1.0}
            tags = {"run_key": f"{label}-{seed}", "sweep": "lane_count", "arch": arch,
                    "recipe": recipe, "label": label}
            log_run(client, exp, f"{label}-s{seed}", params, tags, loss_curve(final), eval_every=10)
    label = "burger-L4-d12-b1-c1"
    base = _arch_params("tpb", "burger", 4) | {"n_params": 100004, "syncs": 3, "decode_speedup": 2.0}
    tags = {"sweep": "lane_count", "arch": "tpb", "recipe": "burger", "label": label}
    log_run(client, exp, f"{label}-s0", base | _common(0), tags | {"run_key": "b4-0", "error": "NonFiniteError: loss nan"},
            loss_curve(4.0)[:3], status="FAILED")
    log_run(client, exp, f"{label}-s1", base | _common(1), tags | {"run_key": "b4-1"}, loss_curve(4.0)[:5],
            status="KILLED")
    label = "sandwich-L4-d12-b1-c1"
    params = _arch_params("tpb", "sandwich", 4) | _common(2) | {"n_params": 100004, "syncs": 3, "decode_speedup": 2.0}
    log_run(client, exp, f"{label}-s2", params, {"run_key": "s4-2", "label": label, "arch": "tpb"},
            loss_curve(3.6)[:7], status="RUNNING")


def _fill_variance(client) -> None:
    exp = client.create_experiment("variance")
    for arch in ("llama", "burger"):
        for schedule in ("cosine", "wsd"):
            for seed in (0, 1):
                label = "llama-H64-n4" if arch == "llama" else "burger-L4-d4-b2-c1"
                params = _arch_params("tpb" if arch == "burger" else "llama", "burger", 4, depth=4)
                params = params | _common(seed, schedule) | {"architecture.arch": arch}
                log_run(client, exp, f"{label}-{schedule}-s{seed}", params,
                        {"run_key": f"{arch}-{schedule}-{seed}", "label": label}, variance_curve(arch, seed))


def _fill_study(client) -> None:
    exp = client.create_experiment("speed_quality")
    # trial: (final loss, decode speed-up); trials 0, 2, 3 are on the Pareto front, 1 is dominated by 0
    for trial, (final, speedup) in enumerate([(3.2, 2.0), (3.3, 1.5), (3.0, 1.2), (3.6, 3.0)]):
        params = _arch_params("tpb", "sandwich", 2 + trial, depth=3) | _common(0)
        params |= {"architecture.lane_count": 2 + trial, "decode_speedup": speedup, "n_params": 1000, "syncs": 3}
        log_run(client, exp, f"trial-{trial}", params, {"run_key": f"t{trial}", "trial": trial,
                                                         "label": f"sandwich-L{2 + trial}"}, loss_curve(final, 5),
                eval_every=5)


class ArtifactsIn:
    """An MlflowClient whose experiments keep their artifacts (the report's parent run) in `root`, not in
    ./mlruns of the directory pytest runs in."""

    def __init__(self, client, root):
        self.client, self.root = client, root

    def create_experiment(self, name, **kw):
        return self.client.create_experiment(name, artifact_location=(self.root / name).as_uri(), **kw)

    def __getattr__(self, name):
        return getattr(self.client, name)


def make_store(folder) -> tuple[str, ArtifactsIn]:
    """An empty SQLite store in `folder` and its client (artifacts in folder/mlartifacts)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    return uri, ArtifactsIn(MlflowClient(tracking_uri=uri), folder / "mlartifacts")


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> str:
    """Tracking URI of the filled store (built once per test session: ~3 s)."""
    uri, client = make_store(tmp_path_factory.mktemp("mlflow"))
    _fill_lane_count(client)
    _fill_variance(client)
    _fill_study(client)
    nothing = client.create_experiment("nothing_done")
    log_run(client, nothing, "crashed", _arch_params("llama", "", 1) | _common(0), {"run_key": "x", "label": "llama"},
            [5.0], status="FAILED")
    client.create_experiment("empty")
    _fill_resumed(client)
    return uri


def _fill_resumed(client) -> None:
    """One run whose step 3 was logged twice (resume) and whose step 4 is NaN."""
    from mlflow.entities import Metric

    exp = client.create_experiment("resumed")
    run_id = log_run(client, exp, "resumed", {"protocol.seed": 0}, {"run_key": "r"}, [5.0, 4.0, 9.0, 0.0, 2.0])
    client.log_batch(run_id, metrics=[Metric("train_loss", 3.0, 5000, 3), Metric("train_loss", float("nan"), 5000, 4)])


@pytest.fixture
def new_store(tmp_path):
    """(uri, client) of an empty store of its own, for tests that write to it."""
    return make_store(tmp_path)
