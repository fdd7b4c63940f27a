"""The one device table (analysis/devices.py): the decode-time model and the trainer's MFU read the same peaks."""

from __future__ import annotations

import pytest
import torch

from analysis.devices import DEVICES, get_device, peak_flops_of
from trainers import loop

# torch.cuda.get_device_name -> dense bf16 peak per torch device; the first five are the trainer's old table
NAMES = [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),  # A100, not A10: the longest name wins
    ("NVIDIA L40S", 181e12),
    ("NVIDIA A10", 125e12),
    ("Tesla V100-SXM2-32GB", 125e12),
    ("AMD Instinct MI250X", 383e12 / 2),  # torch shows each of the 2 dies as a device
    ("AMD Instinct MI300A", 980.6e12),
]


@pytest.mark.parametrize("name, peak", NAMES)
def test_peak_flops_of_a_torch_device_name(name, peak):
    assert peak_flops_of(name) == pytest.approx(peak, rel=1e-12)


def test_unknown_devices_and_dies():
    assert peak_flops_of("NVIDIA GeForce RTX 4090") is None and peak_flops_of("") is None
    assert {d.name: d.dies for d in DEVICES.values() if d.dies != 1} == {"MI250X": 2}
    assert get_device("MI250X").flops == 383e12  # the decode model keeps the whole package
    with pytest.raises(ValueError, match="dies=0"):
        get_device("H100", dies=0)


@pytest.mark.parametrize("name, peak", NAMES)
def test_the_trainer_mfu_reads_the_table(monkeypatch, name, peak):
    monkeypatch.delenv("TPB_PEAK_FLOPS", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda", 0)
    assert loop.peak_flops(cuda, "bf16") == pytest.approx(peak, rel=1e-12)
    assert loop.peak_flops(cuda, "fp32") == pytest.approx(peak / 2, rel=1e-12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert loop.peak_flops(cuda, "bf16") == 1e14
