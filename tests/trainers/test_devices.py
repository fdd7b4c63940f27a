"""GPUs found without initialising CUDA: CUDA_VISIBLE_DEVICES, else NVML, else `nvidia-smi -L`, else none."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainers import devices
from trainers.devices import Gpus, visible_gpus

ROOT = Path(__file__).resolve().parents[2]


def fake_smi(folder: Path, n_gpus: int, fail: bool = False) -> Path:
    """An `nvidia-smi` printing what the real one prints for `-L` on an n-GPU node (MIG lines included)."""
    lines = [f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d}-aaaa-bbbb-cccc-dddddddddddd)" for i in range(n_gpus)]
    if n_gpus:
        lines.insert(1, "  MIG 1g.10gb     Device  0: (UUID: MIG-00000000-aaaa-bbbb-cccc-dddddddddddd)")
    body = ("echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9"
            if fail else "\n".join(f"echo '{line}'" for line in lines))
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n[ \"$1\" = -L ] || exit 2\n{body}\n")
    script.chmod(0o755)
    return folder


@pytest.fixture
def no_driver(monkeypatch):
    """CUDA_VISIBLE_DEVICES unset and no NVML, whatever this machine has."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(devices, "_nvml_count", lambda: None)


@pytest.mark.parametrize("value,ids", [
    ("3,5,7", [3, 5, 7]),
    ("0", [0]),
    ("", []),                                   # CUDA: no device
    ("-1", []),                                 # the usual way of hiding every GPU
    ("0,1,-1,2", [0, 1]),                       # CUDA stops at the first invalid entry
    ("GPU-8f1e2a3b,GPU-12ab34cd", [0, 1]),      # UUIDs: the child's 0..n-1
])
def test_cuda_visible_devices_wins(monkeypatch, tmp_path, value, ids):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    monkeypatch.setenv("PATH", f"{fake_smi(tmp_path, 8)}{os.pathsep}{os.environ['PATH']}")  # not asked
    assert visible_gpus() == Gpus(ids, "CUDA_VISIBLE_DEVICES")


@pytest.mark.parametrize("n_gpus", [1, 2, 4])
def test_nvidia_smi_on_path_counts_its_gpu_lines(monkeypatch, tmp_path, no_driver, n_gpus):
    monkeypatch.setenv("PATH", f"{fake_smi(tmp_path, n_gpus)}{os.pathsep}{os.environ['PATH']}")
    assert visible_gpus() == Gpus(list(range(n_gpus)), "nvidia-smi")


def test_no_gpu_when_nvidia_smi_lists_none_fails_or_is_missing(monkeypatch, tmp_path, no_driver):
    monkeypatch.setenv("PATH", str(fake_smi(tmp_path, 0)))
    assert visible_gpus() == Gpus([], "")
    monkeypatch.setenv("PATH", str(fake_smi(tmp_path, 2, fail=True)))
    assert visible_gpus() == Gpus([], "")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert visible_gpus() == Gpus([], "")


def test_nvml_comes_before_nvidia_smi(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(devices, "_nvml_count", lambda: 3)
    monkeypatch.setenv("PATH", f"{fake_smi(tmp_path, 8)}{os.pathsep}{os.environ['PATH']}")
    assert visible_gpus() == Gpus([0, 1, 2], "NVML")


class _FakeNvml:
    """libnvidia-ml's three entry points, on a node with `count` GPUs (init_status != 0: the driver refuses)."""

    def __init__(self, count: int, init_status: int = 0) -> None:
        self.count, self.init_status, self.calls = count, init_status, []

    def nvmlInit_v2(self) -> int:
        self.calls.append("init")
        return self.init_status

    def nvmlDeviceGetCount_v2(self, ref) -> int:
        self.calls.append("count")
        ref._obj.value = self.count
        return 0

    def nvmlShutdown(self) -> int:
        self.calls.append("shutdown")
        return 0


def test_nvml_count_asks_the_driver_library_and_shuts_it_down(monkeypatch):
    lib = _FakeNvml(4)
    monkeypatch.setattr(devices.ctypes, "CDLL", lambda name: lib if name == "libnvidia-ml.so.1" else None)
    assert devices._nvml_count() == 4 and lib.calls == ["init", "count", "shutdown"]
    refusing = _FakeNvml(4, init_status=9)  # NVML_ERROR_DRIVER_NOT_LOADED
    monkeypatch.setattr(devices.ctypes, "CDLL", lambda name: refusing)
    assert devices._nvml_count() is None and refusing.calls == ["init"]

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(devices.ctypes, "CDLL", missing)
    assert devices._nvml_count() is None


@pytest.mark.skipif(devices._nvml_count() is not None, reason="gpu: a real NVIDIA driver answers before nvidia-smi")
def test_detection_in_a_fresh_process_never_imports_torch(tmp_path):
    """What the parent does before submitit forks: detect the GPUs (here 2, from a fake nvidia-smi) and size the
    local pool; torch is never imported by the detection, and CUDA is not initialised by the capacity."""
    code = ("import sys\n"
            "from trainers.devices import visible_gpus\n"
            "found = visible_gpus()\n"
            "assert 'torch' not in sys.modules, 'detection imported torch'\n"
            "from orchestrator.config import ClusterConfig, RunConfig\n"
            "from orchestrator.pool import local_capacity\n"
            "slots, threads, gpus = local_capacity(RunConfig(cluster=ClusterConfig()), 11)\n"
            "import torch\n"
            "print(found.ids, found.source, slots, gpus, torch.cuda.is_initialized())\n")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = f"{fake_smi(tmp_path, 2)}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[0,", "1]", "nvidia-smi", "2", "[0,", "1]", "False"]
