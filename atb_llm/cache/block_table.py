"""The blocks one sequence holds, per group: what the block manager grows and frees, and what
the cache manager turns into the forward contract's block tables."""

from __future__ import annotations

import torch


class BlockTable:
    """rows[g]: physical block ids of group g, in logical order (slot i lives in rows[g][i // block_size])."""

    __slots__ = ("rows", "_tensor")

    def __init__(self, rows: list[list[int]] | None = None):
        self.rows: list[list[int]] = rows or []
        self._tensor: torch.Tensor | None = None

    def __bool__(self) -> bool:
        return any(self.rows)

    def __getitem__(self, group: int) -> list[int]:
        return self.rows[group]

    def reset(self, num_groups: int) -> None:
        self.rows = [[] for _ in range(num_groups)]
        self._tensor = None

    def extend(self, group: int, ids: list[int]) -> None:
        self.rows[group].extend(ids)
        self._tensor = None

    def clear(self) -> None:
        self.rows = []
        self._tensor = None

    def tensor(self) -> torch.Tensor:
        """[G, width] int64 block ids, padded with 0; built once per change."""
        if self._tensor is None:
            width = max(len(r) for r in self.rows)
            self._tensor = torch.tensor([r + [0] * (width - len(r)) for r in self.rows], dtype=torch.int64)
        return self._tensor
