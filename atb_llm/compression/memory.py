"""KV-cache memory of a group layout, counted in the whole blocks the block manager allocates."""

from __future__ import annotations

import torch

from atb_llm.compression.layout import GroupLayout
from atb_llm.compression.levels import Level


def level_bytes(level: Level, num_tokens: int, head_dim: int, dtype: torch.dtype, block_size: int) -> int:
    """Bytes one group at `level` holds for a sequence of `num_tokens` tokens, in whole blocks."""
    return level.blocks(num_tokens, block_size) * level.storage.bytes_per_block(block_size, head_dim, dtype)


def kv_bytes_by_level(
    layout: GroupLayout, num_tokens: int, head_dim: int, dtype: torch.dtype, block_size: int
) -> dict[str, int]:
    """Bytes one sequence of `num_tokens` tokens holds, per level name."""
    out: dict[str, int] = {}
    for level, groups in layout.groups_by_level().items():
        out[level.name] = out.get(level.name, 0) + len(groups) * level_bytes(
            level, num_tokens, head_dim, dtype, block_size
        )
    return out


def kv_bytes(layout: GroupLayout, num_tokens: int, head_dim: int, dtype: torch.dtype, block_size: int) -> int:
    return sum(kv_bytes_by_level(layout, num_tokens, head_dim, dtype, block_size).values())


def sequences_that_fit(
    layout: GroupLayout, budget_bytes: int, num_tokens: int, head_dim: int, dtype: torch.dtype, block_size: int
) -> int:
    return budget_bytes // kv_bytes(layout, num_tokens, head_dim, dtype, block_size)
