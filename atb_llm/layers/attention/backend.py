"""The attention backend interface: one object per device kind implements it; model code calls
only these methods and never branches on the device or on compression levels."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from atb_llm.cache.kv_cache import KVCache
from atb_llm.layers.attention.metadata import AttentionMetadata


class AttentionBackend(ABC):
    name = "abstract"

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, head_dim: int) -> tuple[int, ...]:
        """Shape of the K (and V) tensor of one pool: a block holds one KV head's tokens."""
        return (num_blocks, block_size, head_dim)

    def store(self, kv_cache: KVCache, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """k, v: [T, Hkv, D] this step's keys (after RoPE) and values, written into every group of
        `layer` as its level keeps them."""
        kv_cache.store(layer, k, v, meta)

    @abstractmethod
    def prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """Causal attention of each packed prompt over itself, every head over the full prompt.
        q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D]."""

    @abstractmethod
    def decode(
        self, q: torch.Tensor, kv_cache: KVCache, layer: int, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """One query token per sequence over what each group of `layer` keeps.
        q: [B, Hq, D] -> [B, Hq, D]."""


BY_DEVICE = {"cpu": "torch", "cuda": "triton", "npu": "npu"}


def get_backend(device: torch.device | str, name: str | None = None) -> AttentionBackend:
    """The attention backend for `device`: torch on cpu, triton on cuda, npu on npu. `name`
    ("torch", "triton", "npu") forces one, e.g. the torch reference on a GPU, or the Triton
    kernels on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1)."""
    if name is None:
        name = BY_DEVICE.get(str(device).split(":")[0])  # not torch.device(): "npu" parses only with torch_npu
        if name is None:
            raise ValueError(f"device={device!r} has no attention backend; use cpu, cuda or npu")
    if name == "torch":
        from atb_llm.layers.attention.torch_backend import TorchBackend

        return TorchBackend()
    if name == "triton":
        from atb_llm.layers.attention.triton_backend import TritonBackend

        return TritonBackend()
    if name == "npu":
        from atb_llm.layers.attention.npu_backend import NpuBackend

        return NpuBackend()
    raise ValueError(f"attention backend {name!r} is unknown; use torch, triton or npu (or None: by device)")
