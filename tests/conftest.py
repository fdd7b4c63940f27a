"""Suite-wide hooks: the `gpu` marker, and no silent skips where the environment says every test must run.

- A test marked `gpu` skips when torch sees no CUDA device: the one skip CI allows (a machine without CUDA).
  The converse, a CPU-only check that cannot run where a real NVIDIA driver answers, skips with a reason that
  starts with "gpu: " too, and is allowed the same way (.ci/run's junit check reads the same prefix).
- When TPB_REQUIRE_SERVICES is set (.ci/run sets it to the services it starts), any other skip is an error:
  a skipped test, a skipping fixture or a module skipped at collection (importorskip) fails the run, so a dead
  service, a missing driver or a failed mount can never pass CI as a skip. Expected failures (xfail) stay as
  they are. Service fixtures (tests/infra/conftest.py) already fail for a required service; this catches the
  rest.
"""

from __future__ import annotations

import os

import pytest


def required_services() -> str:
    return os.environ.get("TPB_REQUIRE_SERVICES", "").strip()


def _skip_reason(longrepr) -> str:
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _refuse_skip(report, what: str) -> None:
    report.outcome = "failed"
    report.longrepr = (f"{what} skipped ({_skip_reason(report.longrepr)}), but TPB_REQUIRE_SERVICES="
                       f"{required_services()} says every test not marked gpu must run here")


def pytest_runtest_setup(item) -> None:
    if item.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("gpu: no CUDA device on this machine")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and required_services() and not hasattr(report, "wasxfail")
            and item.get_closest_marker("gpu") is None and not _skip_reason(report.longrepr).removeprefix("Skipped: ").startswith("gpu: ")):
        _refuse_skip(report, "test")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and required_services():
        _refuse_skip(report, f"collection of {collector.nodeid}")
