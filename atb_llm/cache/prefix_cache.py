"""Automatic prefix caching over the per-group block tables, made to work with MLGC levels.

A full block of a sequence's tokens (block_size tokens, computed) is known by a hash chained over
every token before it, so equal hashes mean equal prefixes. Groups at a level that keeps every
token (`full`, `full_int8`) hold that block's K/V at the same logical index whatever comes after:
an entry records their blocks, and a later request whose prompt starts with the same blocks shares
them (a reference count per block) instead of computing them again.

A `window` group's blocks hold a ring that the next tokens overwrite, so they cannot be shared.
An entry may instead carry a *snapshot*: copies of every window group's blocks taken right after
the prefix's last token. A request reuses a prefix only up to an entry with a snapshot (when the
layout has window groups), and gets the snapshot copied into its own window blocks. Snapshots are
taken where requests are seen to share a prefix: a request whose full groups match further than
any snapshot computes its prompt in two parts, and the snapshot is taken between them, for the
requests after it.

Entries nobody holds stay in their blocks until the blocks are needed (least recently used first).

Chains start from a `namespace`: the LoRA adapter a sequence runs with (0 for the base model), so
blocks computed under one adapter never serve another.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from atb_llm.cache.block_pool import BlockPool
from atb_llm.compression.layout import GroupLayout


@dataclass
class Entry:
    parent: object  # hash of the block before; for the first, its chain's start (see PrefixCache.hashes)
    tokens: tuple[int, ...]
    blocks: tuple[int, ...]  # one per full-level group, in PrefixCache.groups order
    snapshot: tuple[tuple[int, ...], ...] | None = None  # per window group, its blocks after this prefix


class PrefixCache:
    def __init__(self, layout: GroupLayout, pools: dict[str, BlockPool], block_size: int):
        self.layout = layout
        self.block_size = block_size
        self.pools = pools
        self.groups = [g for g, lv in enumerate(layout.levels) if not lv.drops_tokens]
        self.group_pools = [layout.levels[g].pool for g in self.groups]
        self.window_groups = [g for g, lv in enumerate(layout.levels) if lv.drops_tokens]
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self.query_tokens = 0  # prompt tokens looked up, since start
        self.hit_tokens = 0  # of which found

    @staticmethod
    def start(namespace: int) -> object:
        """What the chain of a namespace's first block hangs from."""
        return None if namespace == 0 else ("namespace", namespace)

    def hashes(self, tokens: list[int], num_blocks: int, namespace: int = 0) -> list[tuple[int, tuple[int, ...]]]:
        """(hash, tokens) of the first `num_blocks` full blocks of `tokens`, chained."""
        out, h, bs = [], self.start(namespace), self.block_size
        for i in range(num_blocks):
            block = tuple(tokens[i * bs : (i + 1) * bs])
            h = hash((h, block))
            out.append((h, block))
        return out

    def match(self, tokens: list[int], max_blocks: int, namespace: int = 0) -> tuple[list[Entry], int]:
        """(the entries of the longest reusable prefix of `tokens`, at most `max_blocks` blocks;
        how many blocks the full-level groups alone match). With window groups a prefix is
        reusable up to the last entry with a snapshot."""
        found, parent = [], self.start(namespace)
        for h, block in self.hashes(tokens, max_blocks, namespace):
            entry = self.entries.get(h)
            if entry is None or entry.tokens != block or entry.parent != parent:
                break
            found.append(entry)
            parent = h
        usable = len(found)
        if self.window_groups:
            while usable and found[usable - 1].snapshot is None:
                usable -= 1
        return found[:usable], len(found)

    def touch(self, tokens: list[int], num_blocks: int, namespace: int = 0) -> None:
        """Mark a prefix as just used; its later blocks are evicted before its earlier ones."""
        for h, _ in reversed(self.hashes(tokens, num_blocks, namespace)):
            self.entries.move_to_end(h)

    def insert(self, tokens: list[int], rows: list[list[int]], num_blocks: int, namespace: int = 0) -> None:
        """Record the first `num_blocks` full blocks of a sequence (rows: its block table) unless
        an entry for the same prefix exists."""
        parent = self.start(namespace)
        for i, (h, block) in enumerate(self.hashes(tokens, num_blocks, namespace)):
            if h not in self.entries:
                blocks = tuple(rows[g][i] for g in self.groups)
                for pool, b in zip(self.group_pools, blocks):
                    self.pools[pool].cache(b)
                self.entries[h] = Entry(parent, block, blocks)
            parent = h

    def entry(self, tokens: list[int], num_blocks: int, namespace: int = 0) -> Entry | None:
        return self.entries.get(self.hashes(tokens, num_blocks, namespace)[-1][0]) if num_blocks else None

    def _snapshot_blocks(self, entry: Entry) -> list[tuple[str, int]]:
        """(pool, block) of the entry's window snapshot (none without one)."""
        return [
            (self.layout.levels[g].pool, b) for g, ids in zip(self.window_groups, entry.snapshot or ()) for b in ids
        ]

    def _blocks(self, entry: Entry) -> list[tuple[str, int]]:
        """(pool, block) of everything the entry holds."""
        return [*zip(self.group_pools, entry.blocks), *self._snapshot_blocks(entry)]

    def idle_blocks(self, entries: list[Entry]) -> dict[str, int]:
        """Blocks of `entries` nobody holds now, per pool: reusing the prefix takes them (the
        shared ones, and the last entry's snapshot while it is copied) off the free count."""
        out = dict.fromkeys(self.pools, 0)
        for e in entries:
            for pool, b in zip(self.group_pools, e.blocks):
                out[pool] += self.pools[pool].is_idle(b)
        for pool, b in self._snapshot_blocks(entries[-1]) if entries else ():
            out[pool] += self.pools[pool].is_idle(b)
        return out

    def evict(self, pool: str, needed: int) -> None:
        """Forget least recently used cached blocks nobody holds until `pool` has `needed` clean
        blocks: an entry's snapshot (even while its shared blocks are in use), then the entry."""
        for h in list(self.entries):
            if self.pools[pool].num_clean >= needed:
                return
            entry = self.entries[h]
            snap = self._snapshot_blocks(entry)
            if snap and all(self.pools[p].is_idle(b) for p, b in snap):
                entry.snapshot = None
                for p, b in snap:
                    self.pools[p].evict(b)
            if all(self.pools[p].is_idle(b) for p, b in self._blocks(entry)):
                del self.entries[h]
                for p, b in self._blocks(entry):
                    self.pools[p].evict(b)

    @property
    def num_cached_blocks(self) -> int:
        return sum(len(self._blocks(e)) for e in self.entries.values())
