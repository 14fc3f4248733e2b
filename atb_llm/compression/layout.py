"""Which level each attention-head group keeps, and which block pool its blocks come from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from atb_llm.compression.levels import Level, Storage


@dataclass(frozen=True)
class Run:
    """The heads of one layer that share a level (so they share slot geometry and pool)."""

    level: Level
    heads: tuple[int, ...]  # KV-head indices within the layer
    groups: torch.Tensor  # [h] global group ids (layer * num_kv_heads + head)

    @property
    def pool(self) -> str:
        return self.level.pool

    def all_heads(self, num_kv_heads: int) -> bool:
        return self.heads == tuple(range(num_kv_heads))


@dataclass(frozen=True)
class GroupLayout:
    """levels[g] is the level of group g = layer * num_kv_heads + kv_head."""

    num_layers: int
    num_kv_heads: int
    levels: tuple[Level, ...]
    _runs: list = field(init=False, repr=False, compare=False)
    _by_level: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if len(self.levels) != self.num_layers * self.num_kv_heads:
            raise ValueError(
                f"a layout of {self.num_layers} layers x {self.num_kv_heads} KV heads needs "
                f"{self.num_layers * self.num_kv_heads} levels, got {len(self.levels)}"
            )
        runs = []
        for layer in range(self.num_layers):
            by_level: dict[Level, list[int]] = {}
            for head in range(self.num_kv_heads):
                by_level.setdefault(self.level(layer, head), []).append(head)
            runs.append(
                [
                    Run(lv, tuple(hs), torch.tensor([layer * self.num_kv_heads + h for h in hs]))
                    for lv, hs in by_level.items()
                ]
            )
        object.__setattr__(self, "_runs", runs)
        by_level: dict[Level, list[int]] = {}
        for g, lv in enumerate(self.levels):
            by_level.setdefault(lv, []).append(g)
        object.__setattr__(self, "_by_level", by_level)

    @classmethod
    def uniform(cls, num_layers: int, num_kv_heads: int, level: Level | None = None) -> GroupLayout:
        return cls(num_layers, num_kv_heads, (level or Level(),) * (num_layers * num_kv_heads))

    def as_int8(self) -> GroupLayout:
        """Every group at its level's int8 variant (same geometry, half the bytes)."""
        return GroupLayout(self.num_layers, self.num_kv_heads, tuple(lv.as_int8() for lv in self.levels))

    def shard(self, rank: int, world: int) -> GroupLayout:
        """The groups of one tensor-parallel rank: of every layer, the KV heads
        rank * h / world .. (rank + 1) * h / world, each at its level in this layout."""
        if world == 1:
            return self
        if self.num_kv_heads % world:
            raise ValueError(f"{self.num_kv_heads} KV heads per layer cannot be split {world} ways")
        h = self.num_kv_heads // world
        levels = tuple(self.level(layer, rank * h + i) for layer in range(self.num_layers) for i in range(h))
        return GroupLayout(self.num_layers, h, levels)

    @property
    def num_groups(self) -> int:
        return len(self.levels)

    def level(self, layer: int, head: int) -> Level:
        return self.levels[layer * self.num_kv_heads + head]

    def runs(self, layer: int) -> list[Run]:
        return self._runs[layer]

    def groups_by_level(self) -> dict[Level, list[int]]:
        """Group ids of each level, in order of first appearance."""
        return self._by_level

    def pools(self) -> set[str]:
        return {lv.pool for lv in self.levels}

    def storages(self) -> dict[str, Storage]:
        """Pool name -> how that pool stores K/V."""
        return {lv.pool: lv.storage for lv in self.levels}
