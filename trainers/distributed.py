"""torch.distributed set-up from the environment: torchrun, or Slurm through submitit.

torchrun exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under Slurm (srun or a
submitit job with SLURM_NTASKS > 1), or in a local submitit job with several tasks, and without those
variables, submitit's TorchDistributedEnvironment derives and exports them (export_rank_env). A single process (no variables) runs without a process group and without DDP.
Backend: nccl when CUDA is available, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_rank() -> int:
    """This process's global rank from the environment (torchrun, Slurm or a local submitit task), before
    any export: 0 for a single process."""
    for var in ("RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def export_rank_env() -> None:
    """Fill the torchrun variables (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*) when a multi-task job did not
    set them: a Slurm job (srun or submitit) or a local submitit job with several tasks."""
    if "RANK" in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    if os.environ.get("SUBMITIT_EXECUTOR") == "local" and int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        # submitit sets SUBMITIT_EXECUTOR in its own jobs; a plain srun task is a Slurm task all the same
        os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
        # overwrite: a MASTER_PORT set by the user is kept (submitit reads it), the rest is derived from Slurm
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def init_distributed() -> DistEnv:
    """Read the environment, start the process group when world size > 1, pick the device."""
    export_rank_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def wrap(model: nn.Module, env: DistEnv) -> nn.Module:
    """DDP when world size > 1, else the model itself."""
    if not env.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """In-place sum over ranks (a no-op for one process); returns the tensor."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj, env: DistEnv) -> list:
    """One picklable object per rank, in rank order ([obj] for one process)."""
    if not env.distributed:
        return [obj]
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
