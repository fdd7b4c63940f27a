"""Every shipped sweep x every shipped protocol lands within 1% of its budget (issue 10, item 2).

The configs are composed through Hydra exactly as the dry run composes them (tests/orchestrator/test_plan.py's
sweep_jobs: the sweep's grid expanded, each job planned by orchestrator.plan.plan_job). The sweeps and
protocols are globbed, so a protocol or sweep added to conf/ is covered without editing this file.
Each protocol is composed with the default data set (as `python -m orchestrator +sweep=X -m protocol=P`
does) and with the data set its header names (`data=...`), whose vocabulary changes the embedding.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from models.budget import fitted_fields
from models.counts import ffn_shape, non_embedding_params, param_count
from tests.orchestrator.test_plan import hydra_env, sweep_jobs  # noqa: F401 (hydra_env is a fixture)

CONF = Path(__file__).resolve().parents[2] / "conf"
SWEEPS = sorted(p.stem for p in (CONF / "sweep").glob("*.yaml"))
PROTOCOLS = sorted(p.stem for p in (CONF / "protocol").glob("*.yaml"))
DATA = {p.stem for p in (CONF / "data").glob("*.yaml")}
BOUND = 0.01


def named_data(protocol: str) -> list[str]:
    """The data sets a protocol's header comment names (`data=codeparrot`), besides the default."""
    text = (CONF / "protocol" / f"{protocol}.yaml").read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    return sorted(set(re.findall(r"data=([A-Za-z0-9_]+)", header)) & DATA)


COMBOS = [(p, None) for p in PROTOCOLS] + [(p, d) for p in PROTOCOLS for d in named_data(p)]


def test_the_shipped_protocols_are_all_covered():
    assert {"small", "initial", "paper"} <= set(PROTOCOLS)
    assert ("paper", "fineweb_edu") in COMBOS and ("initial", "codeparrot") in COMBOS
    assert len(SWEEPS) >= 9


@pytest.mark.parametrize("sweep", SWEEPS)
@pytest.mark.parametrize("protocol, data", COMBOS, ids=[f"{p}-{d or 'default'}" for p, d in COMBOS])
def test_every_job_is_within_one_percent(hydra_env, sweep, protocol, data):  # noqa: F811
    extra = [f"data={data}"] if data else []
    jobs = sweep_jobs(hydra_env, sweep, protocol, extra)
    assert jobs
    for job in jobs:
        run, arch = job.run, job.run.architecture
        assert run.budget > 0 and run.tolerance == BOUND  # one default, no per-protocol loosening
        assert job.params == param_count(arch)
        deviation = (job.params - run.budget) / run.budget
        assert job.deviation == pytest.approx(deviation)
        assert abs(deviation) <= BOUND, f"{job.run_name}: {deviation:+.2%}"
        # what the dry run shows and the run logs
        width, base, nominal = ffn_shape(arch)
        assert (job.ffn, job.ffn_ratio, job.nominal_ffn_ratio) == (width, width / base, nominal)
        assert job.non_embedding_params == non_embedding_params(arch)
        assert run.budget_fit == "ffn" and job.adjusted == ("hidden", *fitted_fields(arch, "ffn"))
