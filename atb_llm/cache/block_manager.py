"""Per-group block tables: every group of every sequence owns its own blocks.

Plain Python, no torch. A `full` group grows one block per `block_size` tokens; a `window`
group stops at its ring of ceil((sink + recent + 1) / block_size) blocks. Blocks of one level
are allocated for all its groups at once, so admission is decided by the blocks really needed.
"""

from __future__ import annotations

from atb_llm.cache.block_pool import BlockPool
from atb_llm.cache.block_table import BlockTable
from atb_llm.compression.layout import GroupLayout


class BlockManager:
    def __init__(self, layout: GroupLayout, num_blocks: dict[str, int], block_size: int):
        self.layout = layout
        self.block_size = block_size
        self.pools = {name: BlockPool(num_blocks[name]) for name in layout.pools()}
        # Levels with their groups and pool, so per-step work is per level, not per group.
        self._levels = [(lv, gs, lv.pool) for lv, gs in layout.groups_by_level().items()]
        self.used_by_level = {lv.name: 0 for lv, _, _ in self._levels}  # blocks held now, per level
        self.peak_by_level = dict(self.used_by_level)

    def blocks_needed(self, num_tokens: int) -> dict[str, int]:
        """Blocks per pool one sequence of `num_tokens` tokens holds."""
        need = dict.fromkeys(self.pools, 0)
        for lv, gs, pool in self._levels:
            need[pool] += len(gs) * lv.blocks(num_tokens, self.block_size)
        return need

    def _growth(self, table: BlockTable, num_tokens: int) -> list[tuple]:
        """(level, groups, pool, blocks each) to add for `table` to hold `num_tokens` tokens."""
        out = []
        for lv, gs, pool in self._levels:
            have = len(table[gs[0]]) if table.rows else 0
            extra = lv.blocks(num_tokens, self.block_size) - have
            if extra > 0:
                out.append((lv, gs, pool, extra))
        return out

    def _fits(self, growth) -> bool:
        need = dict.fromkeys(self.pools, 0)
        for _, gs, pool, extra in growth:
            need[pool] += len(gs) * extra
        return all(need[p] <= self.pools[p].num_free for p in need)

    def _grow(self, table: BlockTable, growth) -> None:
        for lv, gs, pool, extra in growth:
            ids = self.pools[pool].allocate(len(gs) * extra)
            for i, g in enumerate(gs):
                table.extend(g, ids[i * extra : (i + 1) * extra])
            self.used_by_level[lv.name] += len(ids)
            self.peak_by_level[lv.name] = max(self.peak_by_level[lv.name], self.used_by_level[lv.name])

    def can_allocate(self, table: BlockTable, num_tokens: int) -> bool:
        """Whether a sequence of `num_tokens` tokens fits (prefill), or its next token (decode)."""
        return self._fits(self._growth(table, num_tokens))

    can_append = can_allocate

    def allocate(self, table: BlockTable, num_tokens: int) -> None:
        """Blocks for a whole sequence of `num_tokens` tokens (prefill) into an empty table."""
        if table:
            raise RuntimeError("this block table already holds blocks; deallocate it first")
        table.reset(self.layout.num_groups)
        self._grow(table, self._growth(table, num_tokens))

    def may_append(self, table: BlockTable, num_tokens: int) -> None:
        """Grow the table to hold `num_tokens` tokens (the token this decode step writes included)."""
        growth = self._growth(table, num_tokens)
        if growth:
            self._grow(table, growth)

    def deallocate(self, table: BlockTable) -> None:
        for lv, gs, pool in self._levels:
            ids = [b for g in gs for b in table[g]] if table.rows else []
            self.pools[pool].free(ids)
            self.used_by_level[lv.name] -= len(ids)
        table.clear()

    def num_free(self) -> dict[str, int]:
        return {name: p.num_free for name, p in self.pools.items()}

    def num_used(self) -> dict[str, int]:
        return {name: p.num_used for name, p in self.pools.items()}
