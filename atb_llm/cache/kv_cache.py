"""The cache tensors: one pool of blocks per storage dtype, each block holding `block_size`
tokens of one KV head of one layer. Owned by the cache manager, passed into the model. Storage
only: what each level writes where (and the window's compensation slot) is K/V's path, in
atb_llm.layers.attention.kv_write."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atb_llm.compression.layout import GroupLayout
from atb_llm.compression.levels import Storage


@dataclass
class KVPool:
    """k, v: [num_blocks, block_size, head_dim]; int8 pools add per-token scales [num_blocks, block_size]."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @classmethod
    def allocate(
        cls,
        num_blocks: int,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        storage: Storage,
        device: torch.device | str = "cpu",
    ) -> KVPool:
        shape = (num_blocks, block_size, head_dim)
        # zeros, not empty: slots past a group's read length are masked, and must not hold NaN
        if not storage.int8:
            return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        scale = (num_blocks, block_size)
        return cls(
            torch.zeros(shape, dtype=torch.int8, device=device),
            torch.zeros(shape, dtype=torch.int8, device=device),
            torch.zeros(scale, dtype=torch.float32, device=device),
            torch.zeros(scale, dtype=torch.float32, device=device),
        )

    @property
    def is_int8(self) -> bool:
        return self.k_scale is not None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None)

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots: [N] flat slot ids (block * block_size + offset); k, v: [N, head_dim]."""
        d = self.k.shape[-1]
        if not self.is_int8:
            self.k.view(-1, d).index_copy_(0, slots, k.to(self.k.dtype))
            self.v.view(-1, d).index_copy_(0, slots, v.to(self.v.dtype))
            return
        for data, scale, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, s = Storage.quantize(x)
            data.view(-1, d).index_copy_(0, slots, q)
            scale.view(-1).index_copy_(0, slots, s)

    def read(self, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """slots: [N] -> k, v [N, head_dim] in `dtype`."""
        d = self.k.shape[-1]
        k, v = self.k.view(-1, d)[slots], self.v.view(-1, d)[slots]
        if self.is_int8:
            ks, vs = self.k_scale.view(-1)[slots], self.v_scale.view(-1)[slots]
            return Storage.dequantize(k, ks, dtype), Storage.dequantize(v, vs, dtype)
        return k.to(dtype), v.to(dtype)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Block dst[i] becomes a copy of block src[i] (K, V and int8 scales)."""
        s, d = torch.tensor(src, device=self.k.device), torch.tensor(dst, device=self.k.device)
        for t in (self.k, self.v, self.k_scale, self.v_scale):
            if t is not None:
                t[d] = t[s]

    def gather(self, tables: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """tables: [..., nb] block ids -> k, v [..., nb * block_size, head_dim] in `dtype`."""
        ids = tables.flatten()
        shape = (*tables.shape[:-1], -1, self.k.shape[-1])
        k, v = self.k.index_select(0, ids), self.v.index_select(0, ids)  # index_select: 5x advanced indexing
        if self.is_int8:
            k = Storage.dequantize(k, self.k_scale.index_select(0, ids), dtype)
            v = Storage.dequantize(v, self.v_scale.index_select(0, ids), dtype)
        return k.view(shape), v.view(shape)


class KVCache:
    def __init__(self, layout: GroupLayout, pools: dict[str, KVPool], block_size: int, dtype: torch.dtype):
        self.layout = layout
        self.pools = pools
        self.block_size = block_size
        self.dtype = dtype

    @classmethod
    def allocate(
        cls,
        layout: GroupLayout,
        num_blocks: dict[str, int],
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        storages = layout.storages()
        pools = {
            name: KVPool.allocate(n, block_size, head_dim, dtype, storages[name], device)
            for name, n in num_blocks.items()
        }
        return cls(layout, pools, block_size, dtype)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pools.values())

    def flat_slots(self, tables: torch.Tensor, seq_idx: torch.Tensor, logical: torch.Tensor) -> torch.Tensor:
        """tables: [h, B, nb] block ids; seq_idx, logical: [N] sequence and logical slot of N
        entries -> [h, N] flat slot ids (block * block_size + offset); logical -1 stays -1."""
        safe = logical.clamp(min=0)
        block = tables[:, seq_idx, safe // self.block_size]
        return torch.where(logical < 0, -1, block * self.block_size + safe % self.block_size)
