"""Tensor parallelism (Megatron style): which rank this process is among how many, and the two
collectives the sharded layers need, on torch.distributed (gloo on CPU, NCCL on CUDA, HCCL on
Ascend through torch_npu: the backend torch.distributed was initialised with).

q/k/v and gate/up are column-parallel (each rank its own query heads, KV heads and intermediate
slice), o_proj and down_proj row-parallel (partial sums, one all-reduce each), the LM head
column-parallel (an all-gather of the logits) unless it is tied to the embedding, which is
replicated: a vocab-parallel embedding would add a collective per step to save vocab x hidden bytes
per rank (1.1 GB of Qwen2.5-7B's 15 GB in bf16), and a tied LM head needs the whole table anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    world: int = 1
    group: object = None  # a torch.distributed process group; None: the default one

    @classmethod
    def current(cls) -> TensorParallel:
        """The default process group's rank and size when torch.distributed is initialised (torchrun),
        else a single rank."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def local(self, n: int, what: str) -> int:
        """This rank's share of `n` (heads, rows); a clear error when the world size does not divide it."""
        if n % self.world:
            raise ValueError(
                f"{what}={n} is not divisible by the tensor parallel world size {self.world}; "
                f"run at a world size that divides it"
            )
        return n // self.world

    def take(self, loaded: torch.Tensor, dim: int, local: int) -> torch.Tensor:
        """This rank's slice of a whole tensor along `dim` (unchanged when it is already `local` long)."""
        if self.world == 1 or loaded.shape[dim] == local:
            return loaded
        if loaded.shape[dim] != local * self.world:
            raise ValueError(
                f"a tensor of shape {tuple(loaded.shape)} cannot be split {self.world} ways along dim {dim} "
                f"into {local}; the checkpoint and its config.json do not belong together"
            )
        return loaded.narrow(dim, self.rank * local, local)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's x along the last dimension."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, -1)

    def broadcast(self, obj: object) -> object:
        """Rank 0's `obj` on every rank (the sampled tokens of a step)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


SINGLE = TensorParallel()
