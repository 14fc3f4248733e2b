"""Joining a tensor-parallel world started by torchrun (`torchrun --nproc_per_node N -m examples.run_pa ...`,
multi-node through its rendezvous flags, unchanged): torch.distributed with the device's backend
(gloo on CPU, NCCL on CUDA, HCCL on Ascend) and a bounded collective timeout, so a rank that dies
or hangs ends the others with an error instead of a hang."""

from __future__ import annotations

import os
import sys
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
    kind = device.split(":")[0]
    if kind in ("cuda", "npu"):  # one device a rank: refused before anything loads
        count = torch.cuda.device_count() if kind == "cuda" else torch.npu.device_count()
        if local >= count:
            raise SystemExit(
                f"error: local rank {local} needs {kind} device {local}, but this machine has {count}; run at most "
                f"{count} ranks a machine (--nproc_per_node {count})"
            )
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


def launch_ranks(world_size: int, module: str, argv: list[str]) -> None:
    """Make this process one of `world_size` ranks of `python -m module argv`. Outside torchrun it is
    replaced by `torchrun --standalone --nproc_per_node world_size` (a free rendezvous port on this
    machine; several machines launch torchrun themselves, with its rendezvous flags); under torchrun
    it returns when torchrun started that many ranks and exits with the two numbers otherwise."""
    if world_size < 1:
        raise SystemExit(f"error: a world size of {world_size} ranks was asked; give 1 or more")
    if world_size == 1 and not dist.is_torchelastic_launched():
        return
    if not dist.is_torchelastic_launched():
        run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size)]
        os.execv(sys.executable, [*run, "-m", module, *argv])
    started = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's contract with its workers
    if started != world_size:
        raise SystemExit(f"error: world size {world_size} asked, torchrun started {started} ranks")


def leave_tensor_parallel() -> None:
    """Leave the world cleanly once a rank's work is done: wait for every rank, then destroy the
    process group, so no rank exits while gloo's threads still serve a peer (a rank that exits
    with its group alive can abort with "terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main_rank() -> bool:
    """Rank 0 prints and writes files; the others only compute."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
