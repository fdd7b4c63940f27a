"""The GPUs of this machine and how the local pool shares them, found without initialising CUDA.

The parent process sizes the local pool before submitit starts the jobs: it initialises no CUDA state (a
process forked after CUDA is initialised cannot use CUDA) and does not even import torch. visible_gpus() asks,
in order:

    CUDA_VISIBLE_DEVICES   when set: its ids (as CUDA reads it, up to the first invalid entry: "" and "-1"
                           hide every GPU; UUIDs count as 0..n-1)
    NVML                   libnvidia-ml (the driver's library, what pynvml wraps): nvmlInit + nvmlDeviceGetCount
    nvidia-smi -L          when on PATH: one "GPU i: ..." line per GPU
    nothing found          [] (CPU)

local_slots() turns them into the local pool's capacity: cluster.gpus_per_node = None (auto, cluster=local's
default) runs one job per visible GPU, or on CPU when none is visible; N > 0 gives each job N GPUs (DDP over
N ranks); 0 forces CPU.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from dataclasses import dataclass, field

ENV = "CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class Gpus:
    ids: list[int] = field(default_factory=list)
    """GPU ids a child may be given in CUDA_VISIBLE_DEVICES."""
    source: str = ""
    """Where they were found: CUDA_VISIBLE_DEVICES | NVML | nvidia-smi | '' (none found)."""


def _from_env(value: str) -> list[int]:
    entries = []
    for entry in (e.strip() for e in value.split(",")):
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break  # CUDA ignores everything from the first invalid entry on
        entries.append(entry)
    return [int(e) for e in entries] if all(e.isdigit() for e in entries) else list(range(len(entries)))


def _nvml_count() -> int | None:
    """GPUs the NVIDIA driver reports through NVML (no CUDA context); None without a driver."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        init, device_count, shutdown = nvml.nvmlInit_v2, nvml.nvmlDeviceGetCount_v2, nvml.nvmlShutdown
    except (OSError, AttributeError):  # no driver, or one without the _v2 entry points
        return None
    count = ctypes.c_uint(0)
    if init() != 0:
        return None
    try:
        return count.value if device_count(ctypes.byref(count)) == 0 else None
    finally:
        shutdown()


def _smi_count() -> int | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):  # no driver loaded, hung, ...
        return None
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def visible_gpus() -> Gpus:
    """The GPUs a job of this machine may use (see the module docstring); never imports torch."""
    if ENV in os.environ:
        return Gpus(_from_env(os.environ[ENV]), ENV)
    for source, count in (("NVML", _nvml_count), ("nvidia-smi", _smi_count)):
        found = count()
        if found:
            return Gpus(list(range(found)), source)
    return Gpus()


@dataclass(frozen=True)
class LocalSlots:
    slots: int
    """Jobs running at once."""
    threads: int
    """torch threads of each rank."""
    gpus: list[int]
    """GPU ids the pool hands out ([] on CPU)."""
    gpus_per_job: int
    """0 on CPU."""
    found: Gpus
    refused: str = ""
    """Why a launch on this machine must refuse (a job cannot get its GPUs), naming the field; '' = it fits."""

    def describe(self) -> str:
        """The dry run's line: which case applies."""
        if self.refused:
            return f"local: {self.refused}: a launch on this machine would refuse"
        seen = f"{len(self.found.ids)} GPU(s) visible ({self.found.source})" if self.found.ids else "no GPU visible"
        if not self.gpus_per_job:
            cpu = "CPU (cluster.gpus_per_node=0)" if self.found.ids else "CPU"
            return f"local: {seen}: {cpu}, {self.slots} job(s) at a time, {self.threads} thread(s) per process"
        per = "one job per GPU" if self.gpus_per_job == 1 else f"DDP over {self.gpus_per_job} GPUs per job"
        return f"local: {seen}: {per}, {self.slots} at a time, {self.threads} thread(s) per process"


def gpus_per_job(gpus_per_node: int | None, visible: int) -> int:
    """cluster.gpus_per_node on the local cluster: None = auto (1 when a GPU is visible, else 0 = CPU)."""
    return (1 if visible else 0) if gpus_per_node is None else gpus_per_node


def local_slots(found: Gpus, n_jobs: int, gpus_per_node: int | None, ranks: int, threads_per_job: int = 0,
                max_parallel: int = 0) -> LocalSlots:
    """Capacity of the local pool on this machine's cores (`refused` says why a job cannot get its GPUs).
    ranks = processes per job; threads_per_job / max_parallel 0 = auto."""
    cores = len(os.sched_getaffinity(0))
    per_job = gpus_per_job(gpus_per_node, len(found.ids))
    if per_job > len(found.ids):
        shows = f"this machine shows {len(found.ids)} GPU(s){f' ({found.source})' if found.source else ''}"
        return LocalSlots(0, 0, [], per_job, found, refused=f"cluster.gpus_per_node={per_job}: {shows}")
    if per_job:
        slots = len(found.ids) // per_job
        threads = threads_per_job or max(1, cores // min(slots, max(n_jobs, 1)) // ranks)
    else:  # every rank of every concurrent job gets its own cores
        parallel = max(1, min(n_jobs, cores // ranks))
        threads = threads_per_job or max(1, cores // (parallel * ranks))
        slots = max(1, cores // (threads * ranks))
    if max_parallel:
        slots = min(slots, max_parallel)
    return LocalSlots(max(1, slots), threads, list(found.ids) if per_job else [], per_job, found)
