"""A pool of cache blocks: ids only, no tensors. One pool per storage dtype.

A block is free, used (by one sequence or, shared through the prefix cache, by several: a
reference count), or idle: unused but holding a cached prefix that a later request may take up
again. Idle blocks count as free; they are handed out again only when no truly free block is left,
and then the prefix cache forgets them first (`evict`).
"""

from __future__ import annotations

from collections import deque


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be at least 1")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs: dict[int, int] = {}  # used blocks -> sequences holding them
        self._cached: set[int] = set()  # blocks the prefix cache holds (used or idle)
        self.num_idle = 0  # cached and unused

    @property
    def num_free(self) -> int:
        return len(self._free) + self.num_idle

    @property
    def num_clean(self) -> int:
        """Free blocks holding nothing (idle cached ones not counted)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._refs)

    def allocate(self, n: int) -> list[int]:
        """n blocks that hold nothing (the caller evicts idle cached blocks first when short)."""
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} blocks, {len(self._free)} free of {self.num_blocks}")
        ids = [self._free.popleft() for _ in range(n)]
        self._refs.update(dict.fromkeys(ids, 1))
        return ids

    def share(self, ids: list[int]) -> int:
        """One more holder of each block (in use, or idle in the prefix cache); returns how many
        were idle (now used again)."""
        revived = 0
        for i in ids:
            if i in self._refs:
                self._refs[i] += 1
            elif i in self._cached:
                self._refs[i] = 1
                self.num_idle -= 1
                revived += 1
            else:
                raise RuntimeError(f"block {i} is shared but is neither in use nor cached")
        return revived

    def free(self, ids: list[int]) -> int:
        """One holder less of each block; returns how many are unused now. A cached block becomes
        idle, any other goes back to the free list (freed last, so reused last)."""
        released = 0
        for i in ids:
            if i not in self._refs:
                raise RuntimeError(f"block {i} freed but it is not allocated (double free)")
            self._refs[i] -= 1
            if self._refs[i]:
                continue
            del self._refs[i]
            released += 1
            if i in self._cached:
                self.num_idle += 1
            else:
                self._free.append(i)
        return released

    def cache(self, i: int) -> None:
        """Block `i` (in use) now holds a cached prefix."""
        if i not in self._refs:
            raise RuntimeError(f"block {i} is cached but not allocated")
        self._cached.add(i)

    def evict(self, i: int) -> None:
        """The prefix cache forgets block `i`; if idle, it is free again."""
        self._cached.discard(i)
        if i not in self._refs:
            self.num_idle -= 1
            self._free.append(i)

    def is_idle(self, i: int) -> bool:
        return i in self._cached and i not in self._refs
