"""Block accounting on tiny specs: exact ids, free order, every block freed exactly once."""

import pytest

from atb_llm.cache.block_manager import BlockManager
from atb_llm.cache.block_pool import BlockPool, NoFreeBlocksError
from atb_llm.cache.block_table import BlockTable
from atb_llm.compression.layout import GroupLayout


def test_pool_allocates_in_order_and_reuses_freed_blocks_last():
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    pool.free([1, 0])
    assert pool.allocate(3) == [2, 3, 1]
    assert pool.num_free == 1
    with pytest.raises(NoFreeBlocksError, match="asked for 2 blocks, 1 free of 4"):
        pool.allocate(2)


def test_pool_double_free_is_an_error():
    pool = BlockPool(2)
    ids = pool.allocate(1)
    pool.free(ids)
    with pytest.raises(RuntimeError, match="block 0 freed but it is not allocated"):
        pool.free(ids)


def test_every_group_gets_its_own_blocks():
    layout = GroupLayout.uniform(num_layers=2, num_kv_heads=2)  # 4 groups
    bm = BlockManager(layout, {"model": 32}, block_size=16)
    t = BlockTable()  # 17 tokens: 2 blocks per group
    assert bm.can_allocate(t, 17)
    bm.allocate(t, 17)
    assert t.rows == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert t.tensor().tolist() == t.rows
    assert bm.num_free() == {"model": 24}


def test_decode_grows_a_block_per_group_at_the_boundary():
    bm = BlockManager(GroupLayout.uniform(1, 2), {"model": 8}, block_size=16)
    t = BlockTable()
    bm.allocate(t, 16)
    assert t.rows == [[0], [1]] and t.tensor().tolist() == [[0], [1]]
    assert bm.can_append(t, 17)  # the decode step writes token 17
    bm.may_append(t, 17)
    assert t.rows == [[0, 2], [1, 3]] and t.tensor().tolist() == [[0, 2], [1, 3]]  # the cached tensor follows
    bm.may_append(t, 18)  # same blocks
    assert t.rows == [[0, 2], [1, 3]]


def test_blocks_freed_exactly_once_over_many_sequences():
    bm = BlockManager(GroupLayout.uniform(2, 2), {"model": 64}, block_size=16)
    tables = [BlockTable() for _ in range(4)]
    for t, n in zip(tables, (1, 16, 17, 40)):
        bm.allocate(t, n)
    held = [b for t in tables for row in t.rows for b in row]
    assert len(held) == len(set(held)) == 4 * (1 + 1 + 2 + 3)
    for t in tables:
        bm.deallocate(t)
        assert not t
    assert bm.num_free() == {"model": 64} and bm.num_used() == {"model": 0}
    with pytest.raises(RuntimeError, match="double free"):
        bm.pools["model"].free(held[:1])


def test_admission_counts_blocks_really_needed():
    bm = BlockManager(GroupLayout.uniform(1, 2), {"model": 5}, block_size=16)
    assert bm.blocks_needed(33) == {"model": 6}
    assert not bm.can_allocate(BlockTable(), 33)
    assert bm.can_allocate(BlockTable(), 32)
