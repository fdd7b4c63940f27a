"""Accelerators: memory bandwidth, compute, t_sync. The one device table of the project: the decode-time
model (report section 3, analysis.decode; the dry run's predicted speed-up) and the trainer's MFU
(trainers/loop.py peak_flops, through peak_flops_of) both read it. Standard library only, so the
trainer imports it without analysis's heavy dependencies.

Figures are the vendors' peak numbers for one device (one package for the AMD MI250X, which holds
two dies). `flops` is dense (no sparsity) bf16 matrix throughput, fp16 on the V100 (no bf16).
t_sync, the fixed cost of one synchronisation between devices, is not published by vendors; the
report assumes 5 us (section 3.4), and measurements on V100/P100 report 7-10 us (its ref. [63]).

Two entries follow the report rather than the datasheet, so its worked examples reproduce:
  H100: 3.9 TB/s (report sections 3.4, 4.2, 6.7). That is the H100 NVL's HBM3 bandwidth; the
        H100 SXM5 of a DGX H100 has 3.35 TB/s. Compute is the SXM5's 989 TFLOP/s.
  A100: 2.0 TB/s (report section 3.4); the A100 80GB SXM datasheet says 2.039 TB/s.
Override any figure with get_device(name, mem_bw_bytes_per_s=..., t_sync_s=...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    name: str
    mem_bw_bytes_per_s: float
    """Peak memory (HBM) bandwidth, beta in the report."""
    flops: float
    """Peak dense bf16 matrix FLOP/s (fp16 for the V100), alpha in the report."""
    t_sync_s: float = 5e-6
    """Time of one synchronisation between devices (report eq. 7)."""
    dies: int = 1
    """Dies in the package, each shown by torch as a device of its own (2 for the MI250X)."""

    def __post_init__(self) -> None:
        for field in ("mem_bw_bytes_per_s", "flops", "t_sync_s"):
            value = getattr(self, field)
            if not value >= 0 or (field != "t_sync_s" and value == 0):
                raise ValueError(f"{self.name}: {field}={value!r} must be positive")
        if not isinstance(self.dies, int) or self.dies < 1:
            raise ValueError(f"{self.name}: dies={self.dies!r} must be a positive integer")


DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        Device("V100", mem_bw_bytes_per_s=0.9e12, flops=125e12),  # SXM2 32 GB, fp16 tensor cores
        Device("A100", mem_bw_bytes_per_s=2.0e12, flops=312e12),  # the report's 2 TB/s (80 GB SXM)
        Device("H100", mem_bw_bytes_per_s=3.9e12, flops=989e12),  # the report's 3.9 TB/s (see above)
        Device("H200", mem_bw_bytes_per_s=4.8e12, flops=989e12),
        Device("MI250X", mem_bw_bytes_per_s=3.2768e12, flops=383e12, dies=2),  # whole package (2 dies)
        Device("MI300A", mem_bw_bytes_per_s=5.3e12, flops=980.6e12),
        Device("L40", mem_bw_bytes_per_s=0.864e12, flops=181e12),
        Device("A10", mem_bw_bytes_per_s=0.6e12, flops=125e12),
    )
}


def get_device(name: str, **overrides: float) -> Device:
    """The named device (case-insensitive), with any field overridden, e.g. t_sync_s=7e-6."""
    known = {key.lower(): device for key, device in DEVICES.items()}
    device = known.get(name.lower())
    if device is None:
        raise ValueError(f"unknown device {name!r}; known devices: {', '.join(DEVICES)}")
    fields = {f.name for f in dataclasses.fields(Device)} - {"name"}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown device field(s) {sorted(unknown)}; allowed: {sorted(fields)}")
    given = {key: value for key, value in overrides.items() if value is not None}
    return dataclasses.replace(device, **given)


def peak_flops_of(accelerator: str) -> float | None:
    """Dense bf16 peak FLOP/s of one torch device, from its name as torch gives it
    (torch.cuda.get_device_name: "NVIDIA H100 80GB HBM3", "AMD Instinct MI250X"): the table entry whose
    name it contains, the longest such name first (A100 before A10), divided by its dies; None if none."""
    found = [d for d in DEVICES.values() if d.name.lower() in accelerator.lower()]
    if not found:
        return None
    device = max(found, key=lambda d: len(d.name))
    return device.flops / device.dies
