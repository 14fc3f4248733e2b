"""Joining a tensor-parallel world started by torchrun (`torchrun --nproc_per_node N -m examples.run_pa ...`,
multi-node through its rendezvous flags, unchanged): torch.distributed with the device's backend
(gloo on CPU, NCCL on CUDA, HCCL on Ascend) and a bounded collective timeout, so a rank that dies
or hangs ends the others with an error instead of a hang."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = timedelta(seconds=120)


def init_tensor_parallel(device: str = "cpu", timeout: timedelta = COLLECTIVE_TIMEOUT) -> str:
    """Under torchrun, join its world once (idempotent) and return this rank's device; a single
    process returns `device` unchanged."""
    if not dist.is_torchelastic_launched():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))  # torchrun's own contract with its workers
    if device.startswith("cuda"):
        backend, device = "nccl", f"cuda:{local}"
        torch.cuda.set_device(local)
    elif device.startswith("npu"):
        backend, device = "hccl", f"npu:{local}"
        torch.npu.set_device(local)  # torch_npu
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    return device


def is_main_rank() -> bool:
    """Rank 0 prints and writes files; the others only compute."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
