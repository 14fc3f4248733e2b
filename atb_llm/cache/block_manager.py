"""Per-group block tables: every group of every sequence owns its own blocks.

Plain Python, no torch. A `full` group grows one block per `block_size` tokens; a `window`
group stops at its ring of ceil((sink + recent + 1) / block_size) blocks. Blocks of one level
are allocated for all its groups at once, so admission is decided by the blocks really needed.
"""

from __future__ import annotations

from atb_llm.cache.block_pool import BlockPool
from atb_llm.cache.layout import GroupLayout, pool_of
from atb_llm.runtime.sequence import Sequence


class BlockManager:
    def __init__(self, layout: GroupLayout, num_blocks: dict[str, int], block_size: int):
        self.layout = layout
        self.block_size = block_size
        self.pools = {name: BlockPool(num_blocks[name]) for name in layout.pools()}
        # Levels with their groups and pool, so per-step work is per level, not per group.
        self._levels = [(lv, gs, pool_of(lv)) for lv, gs in layout.groups_by_level().items()]
        self.used_by_level = {lv.name: 0 for lv, _, _ in self._levels}  # blocks held now, per level
        self.peak_by_level = dict(self.used_by_level)

    def blocks_needed(self, num_tokens: int) -> dict[str, int]:
        """Blocks per pool one sequence of `num_tokens` tokens holds."""
        need = dict.fromkeys(self.pools, 0)
        for lv, gs, pool in self._levels:
            need[pool] += len(gs) * lv.blocks(num_tokens, self.block_size)
        return need

    def _growth(self, seq: Sequence, num_tokens: int) -> list[tuple]:
        """(level, groups, pool, blocks each) to add for `seq` to hold `num_tokens` tokens."""
        out = []
        for lv, gs, pool in self._levels:
            have = len(seq.block_table[gs[0]]) if seq.block_table else 0
            extra = lv.blocks(num_tokens, self.block_size) - have
            if extra > 0:
                out.append((lv, gs, pool, extra))
        return out

    def _fits(self, growth) -> bool:
        need = dict.fromkeys(self.pools, 0)
        for _, gs, pool, extra in growth:
            need[pool] += len(gs) * extra
        return all(need[p] <= self.pools[p].num_free for p in need)

    def _grow(self, seq: Sequence, growth) -> None:
        for lv, gs, pool, extra in growth:
            ids = self.pools[pool].allocate(len(gs) * extra)
            for i, g in enumerate(gs):
                seq.block_table[g].extend(ids[i * extra : (i + 1) * extra])
            self.used_by_level[lv.name] += len(ids)
            self.peak_by_level[lv.name] = max(self.peak_by_level[lv.name], self.used_by_level[lv.name])
        seq.table_version += 1

    def can_allocate(self, seq: Sequence) -> bool:
        return self._fits(self._growth(seq, seq.num_tokens))

    def allocate(self, seq: Sequence) -> None:
        """Blocks for the whole sequence (prefill)."""
        if any(seq.block_table):
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks")
        seq.block_table = [[] for _ in range(self.layout.num_groups)]
        self._grow(seq, self._growth(seq, seq.num_tokens))

    def can_append(self, seq: Sequence) -> bool:
        """Whether the next decode step (one more token) fits."""
        return self._fits(self._growth(seq, seq.num_tokens))

    def may_append(self, seq: Sequence) -> None:
        """Grow the tables to hold the token this decode step writes (seq.num_tokens of them)."""
        growth = self._growth(seq, seq.num_tokens)
        if growth:
            self._grow(seq, growth)

    def deallocate(self, seq: Sequence) -> None:
        for lv, gs, pool in self._levels:
            ids = [b for g in gs for b in seq.block_table[g]] if seq.block_table else []
            self.pools[pool].free(ids)
            self.used_by_level[lv.name] -= len(ids)
        seq.block_table = []
        seq.table_version += 1

    def num_free(self) -> dict[str, int]:
        return {name: p.num_free for name, p in self.pools.items()}

    def num_used(self) -> dict[str, int]:
        return {name: p.num_used for name, p in self.pools.items()}
