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
    speculation: tuple[int, int, int] | None = None  # (tokens proposed, accepted, sequence verify steps)

    @property
    def acceptance_rate(self) -> float | None:
        """Share of the proposed tokens accepted (None without speculation or before any proposal)."""
        return self.speculation[1] / self.speculation[0] if self.speculation and self.speculation[0] else None

    @property
    def mean_accepted(self) -> float | None:
        """Tokens a verify step gave a sequence on average: its accepted proposals plus its own."""
        return 1 + self.speculation[1] / self.speculation[2] if self.speculation and self.speculation[2] else None

    @property
    def blocks_used(self) -> int:
        return sum(p["blocks_used"] for p in self.pools.values())
