"""Per-group block tables: every group of every sequence owns its own blocks.

Plain Python (torch only for a level's slot geometry). A `full` group grows one block per
`block_size` tokens; a `window` group stops at its ring of ceil((sink + recent + 1) / block_size)
blocks. Blocks of one level are allocated for all its groups at once, so admission is decided by
the blocks really needed. A block may have several holders (a reference count): with prefix caching, full-level groups
take the blocks of a cached prefix instead of new ones, and the blocks a sequence computed are
recorded when its prefill ends and when it is freed; n > 1 siblings share their parent's complete
blocks (`fork`). Window groups never share: they get copies (of a prefix snapshot, of a parent's
ring), which the block manager only lists (`copies`) for the cache manager to make before the
next step (`flush_copies`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atb_llm.cache.block_pool import BlockPool
from atb_llm.cache.block_table import BlockTable
from atb_llm.cache.prefix_cache import Entry, PrefixCache
from atb_llm.compression.layout import GroupLayout


@dataclass
class Speculation:
    """A verify step's extra rows for one sequence (see BlockManager.speculate): the proposed
    tokens, and for row d = 1..k the block table it reads and writes (rows[d - 1])."""

    tokens: list[int]
    rows: list[BlockTable]
    private: dict[int, list[int]]  # window group -> the logical blocks each row holds a copy of


class BlockManager:
    def __init__(self, layout: GroupLayout, num_blocks: dict[str, int], block_size: int, prefix_caching: bool = False):
        self.layout = layout
        self.block_size = block_size
        self.pools = {name: BlockPool(num_blocks[name]) for name in layout.pools()}
        self.prefix = PrefixCache(layout, self.pools, block_size) if prefix_caching else None
        self.copies: list[tuple[int, list[int], list[int], list[int]]] = []  # (group, src, dst, held) to run
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

    def _fits(self, growth, taken: dict[str, int] | None = None) -> bool:
        need = dict.fromkeys(self.pools, 0)
        for _, gs, pool, extra in growth:
            need[pool] += len(gs) * extra
        return all(need[p] + (taken or {}).get(p, 0) <= self.pools[p].num_free for p in need)

    def _grow(self, table: BlockTable, growth) -> None:
        for lv, gs, pool, extra in growth:
            if self.prefix is not None and self.pools[pool].num_clean < len(gs) * extra:
                self.prefix.evict(pool, len(gs) * extra)
            ids = self.pools[pool].allocate(len(gs) * extra)
            for i, g in enumerate(gs):
                table.extend(g, ids[i * extra : (i + 1) * extra])
            self._count(lv.name, len(ids))

    def _count(self, level: str, blocks: int) -> None:
        self.used_by_level[level] += blocks
        self.peak_by_level[level] = max(self.peak_by_level[level], self.used_by_level[level])

    def _cached_prefix(self, tokens: list[int] | None, num_tokens: int, namespace: int) -> tuple[list[Entry], int]:
        """Cached entries for the start of `tokens`, leaving at least one token to compute, and
        how many blocks the full-level groups match (see PrefixCache.match)."""
        if self.prefix is None or tokens is None:
            return [], 0
        return self.prefix.match(tokens, (num_tokens - 1) // self.block_size, namespace)

    def _with_prefix(self, entries: list[Entry]) -> BlockTable:
        """A table holding the prefix's blocks (what `_growth` counts as already there)."""
        table = BlockTable()
        table.reset(self.layout.num_groups)
        for e in entries:
            for g, b in zip(self.prefix.groups, e.blocks):
                table.extend(g, [b])
        return table

    def can_allocate(
        self, table: BlockTable, num_tokens: int, tokens: list[int] | None = None, namespace: int = 0
    ) -> bool:
        """Whether a sequence of `num_tokens` tokens fits (prefill; `tokens`: its tokens, to count
        a cached prefix of its `namespace`, see PrefixCache), or its next token (decode)."""
        entries, _ = self._cached_prefix(tokens, num_tokens, namespace)
        if entries:  # the prefix's idle blocks are counted free but will be taken
            return self._fits(self._growth(self._with_prefix(entries), num_tokens), self.prefix.idle_blocks(entries))
        return self._fits(self._growth(table, num_tokens))

    def can_append(self, table: BlockTable, num_tokens: int) -> bool:
        return self._fits(self._growth(table, num_tokens))

    def _hold(self, group: int, ids) -> None:
        """One more reference to blocks of `group`'s level (shared, or kept while copied)."""
        lv = self.layout.levels[group]
        self._count(lv.name, self.pools[lv.pool].share(list(ids)))

    def _release(self, group: int, ids) -> None:
        lv = self.layout.levels[group]
        self.used_by_level[lv.name] -= self.pools[lv.pool].free(list(ids))

    def allocate(
        self, table: BlockTable, num_tokens: int, tokens: list[int] | None = None, namespace: int = 0
    ) -> tuple[int, int]:
        """Blocks for a whole sequence of `num_tokens` tokens (prefill) into an empty table.
        `tokens`: its tokens, to reuse a cached prefix. Returns (tokens found in the cache, the
        length after which its window groups should be snapshotted for later requests; 0 = none).
        A reused snapshot is copied into the sequence's window blocks by `flush_copies`."""
        if table:
            raise RuntimeError("this block table already holds blocks; deallocate it first")
        entries, matched = self._cached_prefix(tokens, num_tokens, namespace)
        if matched:  # before growing: what the prompt matched is evicted last
            self.prefix.touch(tokens, matched, namespace)
        table.reset(self.layout.num_groups)
        for e in entries:
            for g, b in zip(self.prefix.groups, e.blocks):
                table.extend(g, [b])
                self._hold(g, [b])
        snapshot = list(zip(self.prefix.window_groups, entries[-1].snapshot or ())) if entries else []
        for g, ids in snapshot:
            self._hold(g, ids)  # until copied
        self._grow(table, self._growth(table, num_tokens))
        for g, ids in snapshot:
            self.copies.append((g, list(ids), table[g][: len(ids)], list(ids)))
        if self.prefix is None or tokens is None:
            return 0, 0
        self.prefix.query_tokens += num_tokens
        self.prefix.hit_tokens += len(entries) * self.block_size
        later = matched > len(entries) and self.prefix.window_groups
        return len(entries) * self.block_size, matched * self.block_size if later else 0

    def snapshot(self, table: BlockTable, tokens: list[int], num_tokens: int, namespace: int = 0) -> None:
        """Record the first `num_tokens` tokens (whole blocks, all computed, nothing after them
        yet) with a copy of every window group's blocks, if the pools have room for it."""
        if self.prefix is None or not table or num_tokens % self.block_size:
            return
        n = num_tokens // self.block_size
        entry = self.prefix.entry(tokens, n, namespace)
        if entry is not None and entry.snapshot is not None:
            return
        groups = self.prefix.window_groups
        need = dict.fromkeys(self.pools, 0)
        for g in groups:
            lv = self.layout.levels[g]
            need[lv.pool] += lv.blocks(num_tokens, self.block_size)
        if not all(need[p] <= self.pools[p].num_free for p in need):
            return
        for p, k in need.items():  # room first: this may evict the prefix's entries too...
            if self.pools[p].num_clean < k:
                self.prefix.evict(p, k)
        self.prefix.insert(tokens, table.rows, n, namespace)  # ...which this records again, from this table
        entry = self.prefix.entry(tokens, n, namespace)
        snapshot = []
        for g in groups:
            lv = self.layout.levels[g]
            src = table[g][: lv.blocks(num_tokens, self.block_size)]
            dst = self.pools[lv.pool].allocate(len(src))
            self._count(lv.name, len(dst))
            for b in dst:
                self.pools[lv.pool].cache(b)
            self._hold(g, src)  # until copied
            self.copies.append((g, src, dst, src + dst))  # then dst is idle, in the cache
            snapshot.append(tuple(dst))
        entry.snapshot = tuple(snapshot)

    def flush_copies(self, copy) -> None:
        """Run the block copies prefix caching asked for: copy(pool, src ids, dst ids) for each,
        then drop the references that kept their blocks while they waited."""
        copies, self.copies = self.copies, []
        for g, src, dst, held in copies:
            copy(self.layout.levels[g].pool, src, dst)
            self._release(g, held)

    def may_append(self, table: BlockTable, num_tokens: int) -> None:
        """Grow the table to hold `num_tokens` tokens (the token this decode step writes included)."""
        growth = self._growth(table, num_tokens)
        if growth:
            self._grow(table, growth)

    def _fork_plan(self, table: BlockTable, num_computed: int) -> list[tuple]:
        """(level, groups, pool, blocks shared, blocks copied) for a copy of `table`: full levels
        share their complete blocks, and copy the partial one and any after it; windows copy all."""
        out = []
        for lv, gs, pool in self._levels:
            have = len(table[gs[0]])
            shared = 0 if lv.drops_tokens else min(num_computed // self.block_size, have)
            out.append((lv, gs, pool, shared, have - shared))
        return out

    def can_fork(self, table: BlockTable, num_computed: int) -> bool:
        need = dict.fromkeys(self.pools, 0)
        for _, gs, pool, _, copied in self._fork_plan(table, num_computed):
            need[pool] += len(gs) * copied
        return all(need[p] <= self.pools[p].num_free for p in need)

    def fork(self, table: BlockTable, num_computed: int) -> BlockTable:
        """A table for another sequence with the same first `num_computed` tokens (n > 1): the
        complete blocks of full-level groups are shared (a reference each), the rest are copies,
        made by `flush_copies` before the next step writes."""
        child = BlockTable()
        child.reset(self.layout.num_groups)
        for lv, gs, pool, shared, copied in self._fork_plan(table, num_computed):
            if self.prefix is not None and self.pools[pool].num_clean < len(gs) * copied:
                self.prefix.evict(pool, len(gs) * copied)
            ids = self.pools[pool].allocate(len(gs) * copied)
            self._count(lv.name, len(ids))
            for i, g in enumerate(gs):
                child.extend(g, table[g][:shared])
                self._hold(g, table[g][:shared])
                src, dst = table[g][shared:], ids[i * copied : (i + 1) * copied]
                child.extend(g, dst)
                if src:
                    self._hold(g, src)  # until copied
                    self.copies.append((g, src, dst, src))
        return child

    def cache(self, table: BlockTable, tokens: list[int], num_computed: int, namespace: int = 0) -> None:
        """Record the full blocks of computed tokens in the prefix cache (no-op without one)."""
        if self.prefix is not None and table:
            self.prefix.insert(tokens, table.rows, num_computed // self.block_size, namespace)

    def deallocate(
        self, table: BlockTable, tokens: list[int] | None = None, num_computed: int = 0, namespace: int = 0
    ) -> None:
        """Free the table's blocks; `tokens` and `num_computed` record its computed blocks in the
        prefix cache (under `namespace`) first."""
        if tokens is not None:
            self.cache(table, tokens, num_computed, namespace)
        for lv, gs, pool in self._levels:
            ids = [b for g in gs for b in table[g]] if table.rows else []
            self.used_by_level[lv.name] -= self.pools[pool].free(ids)
        table.clear()

    # ---- speculative decoding ---------------------------------------------------------------
    def _private_blocks(self, level, num_computed: int, k: int) -> list[int]:
        """A window level's logical blocks that the writes of positions num_computed + 1 .. + k
        change (their ring slots and the compensation slot): what each verify row copies."""
        pos = torch.arange(num_computed + 1, num_computed + k + 1)
        slots = level.slot_of(pos, pos + 1).tolist() + [level.comp_slot]
        return sorted({s // self.block_size for s in slots})

    def speculate(self, table: BlockTable, num_computed: int, tokens: list[int]) -> Speculation | None:
        """Blocks for a verify step of `tokens` proposed after the token at position num_computed
        (which this step computes as plain decode does, in `table`); None, with nothing taken, when
        the pools have no room. Row d (the d-th proposal, at length num_computed + d + 1) must see
        each window group as plain decode would there, but its ring slot is where an earlier row
        still reads the token it evicts: so each row holds its own copies of the blocks the rows'
        writes change (the compensation slot's block and the proposals' ring blocks), made from
        the row before it, layer by layer, before it writes (atb_llm.layers.attention.kv_write),
        and shares every other block. Full groups need no copy: each row writes its own slot and
        reads up to its own length. `commit` keeps the accepted row's copies and frees the rest."""
        k, end = len(tokens), num_computed + len(tokens) + 1
        growth = self._growth(table, end)
        private = [(lv, gs, pool, self._private_blocks(lv, num_computed, k)) for lv, gs, pool in self._levels
                   if lv.comp_slot is not None]  # fmt: skip
        taken = dict.fromkeys(self.pools, 0)
        for _, gs, pool, blocks in private:
            taken[pool] += len(gs) * len(blocks) * k
        if not self._fits(growth, taken):
            return None
        self._grow(table, growth)
        rows = [BlockTable([list(r) for r in table.rows]) for _ in range(k)]
        held: dict[int, list[int]] = {}
        for lv, gs, pool, blocks in private:
            n = len(gs) * len(blocks) * k
            if self.prefix is not None and self.pools[pool].num_clean < n:
                self.prefix.evict(pool, n)
            ids = iter(self.pools[pool].allocate(n))
            self._count(lv.name, n)
            for g in gs:
                held[g] = blocks
                for row in rows:
                    for b in blocks:
                        row.rows[g][b] = next(ids)
        return Speculation(list(tokens), rows, held)

    def commit(self, table: BlockTable, spec: Speculation, accepted: int, num_computed: int) -> None:
        """After a verify step whose first `accepted` proposals were kept (0..k): `table` becomes what
        plain decode would hold after computing the accepted tokens: the accepted row's copies of
        the window groups' changed blocks, every block up to `num_computed` tokens and nothing
        after; every other block this step took is freed."""
        for g, blocks in spec.private.items():
            for d, row in enumerate(spec.rows, start=1):
                ids = [row[g][b] for b in blocks]
                if d == accepted:
                    self._release(g, [table[g][b] for b in blocks])
                    for b, i in zip(blocks, ids):
                        table.rows[g][b] = i
                else:
                    self._release(g, ids)
        self.truncate(table, num_computed)

    def truncate(self, table: BlockTable, num_tokens: int) -> None:
        """Keep the blocks that `num_tokens` tokens need in every group and free the rest (the tail)."""
        for lv, gs, _ in self._levels:
            keep = lv.blocks(num_tokens, self.block_size)
            for g in gs:
                self._release(g, table.rows[g][keep:])
                del table.rows[g][keep:]
        table._tensor = None

    def num_free(self) -> dict[str, int]:
        return {name: p.num_free for name, p in self.pools.items()}

    def num_used(self) -> dict[str, int]:
        return {name: p.num_used for name, p in self.pools.items()}
