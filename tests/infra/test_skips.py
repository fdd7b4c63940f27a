"""No silent skips: with TPB_REQUIRE_SERVICES set, tests/conftest.py turns every skip of a test not marked gpu
into a failure, and the junit check at the end of .ci/run fails on any skip but a gpu one. Run on a small suite
in a subprocess, with a copy of the real conftest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITE = '''
import pytest

def test_runs():
    pass

def test_skips():
    pytest.skip("service down")

@pytest.fixture
def down():
    pytest.skip("fixture: service down")

def test_fixture_skips(down):
    pass

@pytest.mark.gpu
def test_gpu():
    import torch
    assert torch.cuda.is_available()

@pytest.mark.xfail(reason="known")
def test_expected_failure():
    raise AssertionError
'''


def run_suite(tmp_path: Path, required: str | None, skipped_module: bool = True) -> subprocess.CompletedProcess:
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_suite.py").write_text(SUITE)
    module = tmp_path / "test_skipped_module.py"
    if skipped_module:
        module.write_text('import pytest\npytest.importorskip("no_such_module_here")\n')
    else:
        module.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TPB_REQUIRE_SERVICES"}
    if required is not None:
        env["TPB_REQUIRE_SERVICES"] = required
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-o",
                           "markers=gpu", f"--junitxml={tmp_path / 'junit.xml'}", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def junit_check(tmp_path: Path) -> subprocess.CompletedProcess:
    """The check .ci/run runs after pytest, on this junit file."""
    script = (ROOT / ".ci" / "run").read_text().split("python - <<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    script = script.replace("test-artifacts/junit.xml", str(tmp_path / "junit.xml"))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=60)


def test_skips_fail_when_services_are_required_except_gpu_ones(tmp_path):
    import torch

    collected = run_suite(tmp_path, "postgres")  # a module skipped at collection: an error, the run stops
    assert collected.returncode == 2 and "ERROR test_skipped_module.py" in collected.stdout, collected.stdout
    done = run_suite(tmp_path, "postgres", skipped_module=False)
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    for name in ("test_skips", "test_fixture_skips"):
        assert f"FAILED test_suite.py::{name}" in out or f"ERROR test_suite.py::{name}" in out, out
    assert "says every test not marked gpu must run here" in out
    assert "PASSED test_suite.py::test_runs" in out and "XFAIL test_suite.py::test_expected_failure" in out
    if not torch.cuda.is_available():
        assert "SKIPPED [1] conftest.py" in out and "gpu: no CUDA device on this machine" in out, out
        assert out.splitlines()[-1].startswith("1 failed, 1 passed, 1 skipped, 1 xfailed, 1 error"), out
        check = junit_check(tmp_path)
        assert check.returncode == 0, check.stderr  # the gpu skip is the one the junit check lets through


def test_without_the_requirement_skips_stay_skips_and_the_junit_check_names_them(tmp_path):
    done = run_suite(tmp_path, None)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("1 passed, 4 skipped, 1 xfailed"), done.stdout
    check = junit_check(tmp_path)
    assert check.returncode == 1
    assert "test_suite::test_skips: service down" in check.stderr, check.stderr
    assert "fixture: service down" in check.stderr
