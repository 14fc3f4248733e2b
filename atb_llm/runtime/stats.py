"""A snapshot of the engine's scheduler and cache, for metrics and reports (`LLMEngine.stats()`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    preemptions: int  # since start, all sequences
    pools: dict[str, dict[str, int]]  # pool -> CacheManager.usage() row
    levels: dict[tuple[str, str], dict[str, int]]  # (pool, level) -> CacheManager.usage_by_level() row
    prefix: tuple[int, int, int] | None = None  # prefix caching: (query tokens, hit tokens, cached blocks)

    @property
    def blocks_used(self) -> int:
        return sum(p["blocks_used"] for p in self.pools.values())
