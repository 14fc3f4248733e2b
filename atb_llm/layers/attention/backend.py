"""The attention backend interface: one object per device kind implements it; model code calls
only these methods and never branches on the device or on compression levels."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from atb_llm.cache.kv_cache import KVCache
from atb_llm.layers.attention import kv_write
from atb_llm.layers.attention.metadata import AttentionMetadata
from atb_llm.layers.rotary import apply_rotary


class AttentionBackend(ABC):
    """Capabilities: what the code around a backend may hand to it or run beside it. The model,
    PagedAttention, the quantization methods and the CUDA graphs ask for these, never for a name."""

    name = "abstract"  # for messages and the --attention_backend flag
    fused_rope: ClassVar[bool] = False  # RoPE runs in the backend's kernels (prefill rotary, decode_store)
    fused_norm: ClassVar[bool] = False  # residual add + RMSNorm run in one GPU kernel beside it
    gpu_gemms: ClassVar[bool] = False  # quantized linears run the GPU GEMM kernels beside it
    cuda_graphs: ClassVar[bool] = False  # its decode step can be captured as CUDA graphs (on CUDA)

    def store(self, kv_cache: KVCache, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """k, v: [T, Hkv, D] this step's keys (after RoPE) and values, written into every group of
        `layer` as its level keeps them."""
        kv_write.store(kv_cache, layer, k, v, meta)

    def decode_store(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        kv_cache: KVCache,
        layer: int,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """A decode step's cache write: q, k before RoPE when `rope` (RotaryEmbedding.table of the
        step's positions) is given, rotated already when None. Writes k, v as `store` does and
        returns q rotated. Backends may fuse the rotation with the write."""
        if rope is not None:
            q, k = apply_rotary(rope, q, k)
        self.store(kv_cache, layer, k, v, meta)
        return q

    @abstractmethod
    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: KVCache,
        layer: int,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Causal attention of each packed prompt chunk over itself, every head over the whole
        chunk, and over what each group of `layer` keeps of the sequence's earlier chunks
        (meta.context_lens tokens, not yet overwritten by this chunk). Without context this is
        the whole prompt, every head over all of it. q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D]."""

    @abstractmethod
    def decode(
        self, q: torch.Tensor, kv_cache: KVCache, layer: int, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """One query token per sequence over what each group of `layer` keeps.
        q: [B, Hq, D] -> [B, Hq, D]."""
