"""Sizes the block pools, owns the cache tensors and the block manager, and turns sequences'
block tables into the per-step tensors of the forward contract."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atb_llm.cache.block_manager import BlockManager
from atb_llm.cache.block_table import BlockTable
from atb_llm.cache.kv_cache import KVCache
from atb_llm.compression.layout import GroupLayout


@dataclass
class CacheConfig:
    """block_size: tokens per block (a multiple of 16; 128 on Ascend). Pool size: `num_blocks`
    (model-dtype pool; the int8 pool in proportion) or `memory_gb`, else enough for
    `max_batch_size` sequences of `max_seq_len` tokens. prefix_caching: requests share the
    blocks of a prompt prefix computed before (see atb_llm.cache.prefix_cache)."""

    block_size: int = 128
    num_blocks: int | None = None
    memory_gb: float | None = None
    prefix_caching: bool = False

    def __post_init__(self):
        if self.block_size < 16 or self.block_size % 16:
            raise ValueError(f"block_size={self.block_size} must be a positive multiple of 16 (the tensor-core tile)")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks={self.num_blocks} must be at least 1")
        if self.memory_gb is not None and self.memory_gb <= 0:
            raise ValueError(f"memory_gb={self.memory_gb} must be positive")


class CacheManager:
    def __init__(
        self,
        layout: GroupLayout,
        cfg: CacheConfig,
        head_dim: int,
        dtype: torch.dtype,
        max_batch_size: int,
        max_seq_len: int,
        device: torch.device | str = "cpu",
    ):
        self.layout, self.cfg, self.head_dim, self.dtype = layout, cfg, head_dim, dtype
        self._storages = layout.storages()
        probe = BlockManager(layout, dict.fromkeys(layout.pools(), 1), cfg.block_size)
        self.per_sequence = probe.blocks_needed(max_seq_len)  # blocks per pool, one full-length sequence
        self.num_blocks = self._size_pools(max_batch_size)
        self.block_manager = BlockManager(layout, self.num_blocks, cfg.block_size, cfg.prefix_caching)
        self.kv_cache = KVCache.allocate(layout, self.num_blocks, cfg.block_size, head_dim, dtype, device)
        self.device = torch.device(device)
        self._level_groups = [(lv, torch.tensor(gs, device=self.device)) for lv, gs in layout.groups_by_level().items()]

    def bytes_per_block(self, pool: str) -> int:
        return self._storages[pool].bytes_per_block(self.cfg.block_size, self.head_dim, self.dtype)

    def _size_pools(self, max_batch_size: int) -> dict[str, int]:
        need = {p: max(n, 1) for p, n in self.per_sequence.items()}
        if self.cfg.num_blocks is not None:
            base = need.get("model") or next(iter(need.values()))
            return {p: max(1, round(self.cfg.num_blocks * n / base)) for p, n in need.items()}
        if self.cfg.memory_gb is not None:
            seq_bytes = sum(n * self.bytes_per_block(p) for p, n in need.items())
            units = self.cfg.memory_gb * 2**30 / seq_bytes
            return {p: max(1, int(units * n)) for p, n in need.items()}
        return {p: n * max_batch_size for p, n in need.items()}

    @property
    def total_bytes(self) -> int:
        return self.kv_cache.nbytes

    def blocks_for(self, num_tokens: int) -> dict[str, int]:
        return self.block_manager.blocks_needed(num_tokens)

    def fits_alone(self, num_tokens: int) -> bool:
        """Whether one sequence of `num_tokens` tokens fits the pools at all."""
        return all(n <= self.num_blocks[p] for p, n in self.blocks_for(num_tokens).items())

    def longest_sequence(self, limit: int) -> int:
        """The most tokens one sequence can hold in the pools, at most `limit` (window groups stop
        growing, so a compressed cache holds longer sequences in the same blocks)."""
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.fits_alone(mid) else (lo, mid - 1)
        return lo

    def flush_copies(self) -> None:
        """Block copies the prefix cache asked for (snapshots of window groups), before a step."""
        if self.block_manager.copies:
            self.block_manager.flush_copies(lambda pool, src, dst: self.kv_cache.pools[pool].copy_blocks(src, dst))

    # ---- per-step tensors -------------------------------------------------------------------
    def block_tables(self, tables: list[BlockTable]) -> torch.Tensor:
        """[G, B, max_blocks] int64 block ids of B sequences, padded with 0."""
        tabs = [t.tensor() for t in tables]
        width = max(t.shape[1] for t in tabs)
        out = torch.zeros(self.layout.num_groups, len(tabs), width, dtype=torch.int64)
        for i, t in enumerate(tabs):
            out[:, i, : t.shape[1]] = t
        return self.to_device(out)

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor of step inputs on the cache's device; on CUDA copied from pinned memory
        without blocking, so the host queues the copy behind the running step instead of waiting."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def slots(
        self, block_tables: torch.Tensor, seq_idx: torch.Tensor, positions: torch.Tensor, input_lengths: torch.Tensor
    ) -> torch.Tensor:
        """[G, T] flat slot of each new token in each group, -1 where the group's level drops it.
        seq_idx, positions: [T]; input_lengths: [B]."""
        out = torch.empty(self.layout.num_groups, len(positions), dtype=torch.int64, device=self.device)
        n = input_lengths[seq_idx]
        for level, g in self._level_groups:
            out[g] = self.kv_cache.flat_slots(block_tables[g], seq_idx, level.slot_of(positions, n))
        return out

    def usage_by_level(self) -> dict[str, dict[str, int]]:
        """Groups, blocks and bytes held now (and at peak) per level."""
        bm, out = self.block_manager, {}
        for level, groups in self.layout.groups_by_level().items():
            row = out.setdefault(level.name, {"groups": 0})
            row["groups"] += len(groups)
        bpb = {lv.name: self.bytes_per_block(lv.pool) for lv in self.layout.groups_by_level()}
        for name, row in out.items():
            row.update(blocks_used=bm.used_by_level[name], blocks_peak=bm.peak_by_level[name])
            row.update(bytes_used=row["blocks_used"] * bpb[name], bytes_peak=row["blocks_peak"] * bpb[name])
        return out

    def usage(self) -> dict[str, dict[str, int]]:
        """Blocks and bytes used / free per pool (for metrics and reports)."""
        out = {}
        for p, pool in self.block_manager.pools.items():
            bpb = self.bytes_per_block(p)
            out[p] = {
                "blocks_used": pool.num_used,
                "blocks_free": pool.num_free,
                "bytes_used": pool.num_used * bpb,
                "bytes_total": pool.num_blocks * bpb,
            }
        return out
