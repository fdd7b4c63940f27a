"""The analysis command line (python -m analysis): the decode subcommand, its output and its bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from analysis.__main__ import main

approx = pytest.approx


# --- command line ---


def test_decode_command(capsys):
    assert main(["decode"]) == 0
    out = capsys.readouterr().out
    assert "Llama, 22 layers (eq. 9)" in out and "290.51" in out and "3442.2" in out
    assert "85.51" in out and "11694.2" in out and "3.40x" in out
    assert "14181" in out and "4.2" in out and "leaves out the hybrid's own 3 syncs" in out
    assert main(["decode", "--device", "a100", "--gpus", "4", "--examples"]) == 0
    out = capsys.readouterr().out
    assert "4 x A100" in out and "report column shown only" in out and "4.95" in out


def test_decode_command_bad_input(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["decode", "--device", "B200"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unknown device 'B200'; known devices: V100, A100, H100, H200, MI250X, MI300A" in err
    assert "Traceback" not in err
    proc = subprocess.run([sys.executable, "-m", "analysis", "decode", "--gpus", "0"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--gpus=0" in proc.stderr and "Traceback" not in proc.stderr
