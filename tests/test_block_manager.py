"""Block accounting on tiny specs: exact ids, free order, every block freed exactly once."""

import pytest

from atb_llm.cache.block_manager import BlockManager
from atb_llm.cache.block_pool import BlockPool, NoFreeBlocksError
from atb_llm.cache.block_table import BlockTable
from atb_llm.compression.layout import GroupLayout
from atb_llm.compression.levels import FullInt8, Level, Window, WindowInt8
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams

BS = 16


FULL_AND_WINDOW = GroupLayout(1, 2, (Level(), Window(sink=4, recent=12)))  # one KV head each: 16 + 1 slots


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


# ---- prefix caching -----------------------------------------------------------------------------
def prefix_manager(num_blocks=16, layout=None):
    return BlockManager(layout or GroupLayout.uniform(1, 2), {"model": num_blocks}, 16, prefix_caching=True)


def test_a_cached_prefix_is_shared_and_counted_once():
    bm = prefix_manager()
    tokens = list(range(40))  # 2 full blocks + 8 tokens
    a, b = BlockTable(), BlockTable()
    assert bm.allocate(a, 40, tokens) == (0, 0) and a.rows == [[0, 1, 2], [3, 4, 5]]
    bm.cache(a, tokens, 40)  # its prefill ended: blocks 0-1 of each group are cached
    assert bm.allocate(b, 45, tokens + [7] * 5) == (32, 0)  # two blocks found, 13 tokens to compute
    assert b.rows == [[0, 1, 6], [3, 4, 7]]
    assert bm.num_used() == {"model": 8} and bm.used_by_level["full"] == 8  # shared blocks once
    bm.deallocate(a)
    assert bm.num_used() == {"model": 6}  # b still holds the prefix
    bm.deallocate(b)
    assert bm.num_used() == {"model": 0} and bm.num_free() == {"model": 16}
    assert bm.pools["model"].num_idle == 4  # the prefix stays cached in idle blocks
    c = BlockTable()
    assert bm.allocate(c, 33, tokens[:33]) == (32, 0) and c.rows[0][:2] == [0, 1]


def test_at_least_one_token_is_left_to_compute_and_a_different_prefix_misses():
    bm = prefix_manager()
    tokens = list(range(32))
    a = BlockTable()
    bm.allocate(a, 32, tokens)
    bm.deallocate(a, tokens, 32)  # records both blocks on the way out
    assert bm.allocate(BlockTable(), 32, tokens) == (16, 0)  # the last block is computed again
    assert bm.allocate(BlockTable(), 20, [99] + tokens[1:20]) == (0, 0)  # first token differs: nothing
    assert bm.prefix.hit_tokens == 16 and bm.prefix.query_tokens == 32 + 32 + 20


def test_idle_cached_blocks_are_evicted_least_recently_used_first_when_needed():
    bm = prefix_manager(num_blocks=8, layout=GroupLayout.uniform(1, 1))
    old, new = list(range(48)), list(range(100, 148))
    for tokens in (old, new):
        t = BlockTable()
        bm.allocate(t, 48, tokens)
        bm.deallocate(t, tokens, 48)
    assert bm.pools["model"].num_idle == 6 and bm.num_free() == {"model": 8}
    t = BlockTable()
    bm.allocate(t, 64, [7] * 64)  # 4 blocks: the 2 clean ones, then the 2 least recent idle ones
    assert bm.prefix.match(old, 3) == ([], 0) and len(bm.prefix.match(new, 3)[0]) == 3
    assert bm.allocate(BlockTable(), 49, new + [1]) == (48, 0)


def test_growing_may_evict_matched_blocks_that_have_no_snapshot():
    """A full group and a window group: the first prompt's blocks are cached without a snapshot,
    so the second one matches them but cannot use them, and its own blocks need their room."""
    layout = FULL_AND_WINDOW
    bm = BlockManager(layout, {"model": 6}, 16, prefix_caching=True)  # one 64-token sequence: 4 + 2 blocks
    tokens = list(range(64))
    a = BlockTable()
    bm.allocate(a, 64, tokens)
    bm.deallocate(a, tokens, 64)
    assert bm.prefix.match(tokens, 3) == ([], 3) and bm.pools["model"].num_idle == 4
    b = BlockTable()
    assert bm.allocate(b, 64, tokens) == (0, 48)  # nothing usable; snapshot once 48 tokens are computed
    assert bm.prefix.entries == {} and bm.num_used() == {"model": 6}


def test_a_snapshot_made_in_a_full_pool_stays_reachable():
    """The second request matched the first one's idle blocks in the full group but has no window
    snapshot; making room for its snapshot evicts those entries, so they are recorded again from its
    own table and the snapshot hangs on a live entry (no idle block outside an entry)."""
    layout = FULL_AND_WINDOW
    bm = BlockManager(layout, {"model": 9}, 16, prefix_caching=True)
    tokens = list(range(64))
    a = BlockTable()
    bm.allocate(a, 64, tokens)
    bm.deallocate(a, tokens, 64)  # 4 idle blocks in the full group's entries, 5 clean
    b = BlockTable()
    assert bm.allocate(b, 64, tokens) == (0, 48)  # 6 blocks of its own: 5 clean, 1 evicted
    bm.snapshot(b, tokens, 48)  # 2 window blocks: evicts two more entries, records b's blocks
    bm.flush_copies(lambda pool, src, dst: None)
    usable, matched = bm.prefix.match(tokens, 3)
    assert matched == len(usable) == 3 and usable[-1].snapshot is not None
    held = {x for e in bm.prefix.entries.values() for x in (*e.blocks, *(y for ids in e.snapshot or () for y in ids))}
    pool = bm.pools["model"]
    assert pool.num_idle == sum(pool.is_idle(x) for x in held)


def test_a_prefix_snapshotted_once_is_not_copied_again():
    layout = FULL_AND_WINDOW
    bm = BlockManager(layout, {"model": 16}, 16, prefix_caching=True)
    pool, tokens, a = bm.pools["model"], list(range(64)), BlockTable()
    bm.allocate(a, 64, tokens)  # 4 + 2 blocks
    bm.snapshot(a, tokens, 48)  # the window's 2 blocks copied
    bm.flush_copies(lambda pool, src, dst: None)
    snap = bm.prefix.entry(tokens, 3).snapshot
    assert pool.num_clean == 16 - 6 - 2 and pool.num_idle == 2 and len(snap) == 1 and len(snap[0]) == 2
    bm.snapshot(a, tokens, 48)
    assert bm.prefix.entry(tokens, 3).snapshot == snap and pool.num_clean == 8 and not bm.copies
    assert bm.prefix.entry(tokens, 0) is None
    # once a lets go, its blocks and the snapshot are idle: reusing the prefix takes them off the free count
    bm.deallocate(a, tokens, 64)
    usable, matched = bm.prefix.match(tokens, 3)
    assert (len(usable), matched) == (3, 3)
    assert bm.prefix.idle_blocks(usable) == {"model": 3 + 2}
    assert bm.prefix.idle_blocks(usable[:2]) == {"model": 2}  # no snapshot at 32 tokens


def test_a_snapshot_being_copied_is_not_evicted():
    """b reuses a's prefix: the snapshot is held until b's copy of it is made, and eviction in the
    meantime (another request needing room) keeps it for the requests after b."""
    layout = FULL_AND_WINDOW
    bm = BlockManager(layout, {"model": 16}, 16, prefix_caching=True)
    tokens, a, b = list(range(64)), BlockTable(), BlockTable()
    bm.allocate(a, 64, tokens)
    bm.snapshot(a, tokens, 48)
    bm.flush_copies(lambda pool, src, dst: None)
    bm.deallocate(a, tokens, 64)
    assert bm.allocate(b, 56, tokens[:48] + [99] * 8) == (48, 0)
    bm.prefix.evict("model", 16)  # as much room as can be had: a's idle last block goes
    bm.flush_copies(lambda pool, src, dst: None)
    bm.deallocate(b, tokens[:48] + [99] * 8, 56)
    usable, matched = bm.prefix.match(tokens, 3)
    assert (len(usable), matched) == (3, 3) and usable[-1].snapshot is not None


def test_prefix_caching_is_off_unless_asked():
    assert BlockManager(GroupLayout.uniform(1, 1), {"model": 4}, 16).prefix is None
    assert BlockManager(GroupLayout.uniform(1, 1), {"model": 4}, 16, prefix_caching=True).prefix is not None


def test_fork_needs_exactly_the_blocks_it_copies_and_evicts_idle_ones_for_them():
    """A 40-token sequence, one full group (3 blocks) and one window group (2): a fork shares the
    full group's 2 complete blocks and copies its partial one and both window blocks: 3 blocks."""
    layout = FULL_AND_WINDOW
    for total, fits in ((8, True), (7, False)):
        bm = BlockManager(layout, {"model": total}, 16)
        a = BlockTable()
        bm.allocate(a, 40)
        assert bm.can_fork(a, 40) is fits  # 8 - 5 = 3 free: just enough
    # with the prefix cache, room that is idle cached blocks is evicted for the copies
    bm = BlockManager(layout, {"model": 9}, 16, prefix_caching=True)
    d, a = BlockTable(), BlockTable()
    bm.allocate(d, 32, list(range(32)))
    bm.deallocate(d, list(range(32)), 32)  # the full group's 2 blocks stay cached, idle
    bm.allocate(a, 40, list(range(100, 140)))
    pool = bm.pools["model"]
    assert (pool.num_clean, pool.num_idle) == (2, 2) and bm.can_fork(a, 40)
    child = bm.fork(a, 40)
    assert child[0][:2] == a[0][:2] and len(child[0]) == 3 and len(child[1]) == 2
    assert (pool.num_clean, pool.num_idle, len(bm.prefix.entries)) == (0, 1, 1)  # one cached block evicted


# ---- block accounting per level ------------------------------------------------------------------
def test_blocks_needed_per_level_come_from_the_block_manager():
    window = Window(sink=4, recent=27)  # 4 + 27 + 1 = 32 slots: a ring of 2 blocks
    bm = BlockManager(GroupLayout(2, 2, (Level(), window, window, window)), {"model": 100}, BS)
    got = [bm.blocks_needed(n)["model"] for n in (3, 10, 16, 17, 40, 100)]
    assert got == [4, 4, 7, 8, 9, 13]  # 1 full group (ceil(n/16)) + 3 rings (at most 2 blocks each)


def test_per_level_block_counts_return_to_zero(tiny):
    levels = (Level(), Window(sink=4, recent=11), FullInt8(), WindowInt8(sink=4, recent=11))
    engine = LLMEngine(
        EngineConfig(str(tiny), block_size=BS, max_input_length=64, max_output_length=40, progress=False),
        layout=GroupLayout(2, 2, levels),
    )
    engine.generate([[i + 2] * (10 + 7 * i) for i in range(5)], SamplingParams(max_tokens=40, ignore_eos=True))
    usage = engine.cache_manager.usage_by_level()
    assert all(set(u) == {"groups", "blocks_used", "blocks_peak", "bytes_used", "bytes_peak"} for u in usage.values())
    assert {name: u["blocks_used"] for name, u in usage.items()} == dict.fromkeys(usage, 0)
    # peaks: 5 sequences of up to 78 tokens; a full group holds ceil(n / 16) blocks, a window ring one
    assert usage["window"]["blocks_peak"] == usage["window_int8"]["blocks_peak"] == 5
    assert (
        usage["full"]["blocks_peak"]
        == usage["full_int8"]["blocks_peak"]
        == sum(-(-(10 + 7 * i + 39) // BS) for i in range(5))
    )
    assert engine.cache_manager.block_manager.num_free() == {
        p: engine.cache_manager.num_blocks[p] for p in ("model", "int8")
    }


@pytest.mark.parametrize("accepted", [0, 3, 7])
def test_a_verify_step_holds_then_returns_exactly_the_blocks_of_the_accepted_length(accepted):
    """Seven proposals after position 12 cross the full group's block boundary (16) and the window's
    ring; each row copies the window's changed blocks; commit keeps the accepted row's copies and
    exactly blocks(computed) per group, every other block back in the pool."""
    layout = GroupLayout(1, 2, (Level(), Window(sink=4, recent=28)))  # window: 33 slots, 3 blocks
    bm = BlockManager(layout, {"model": 40}, BS)
    table = BlockTable()
    bm.allocate(table, 13)  # 12 computed + the last sampled token
    spec = bm.speculate(table, 12, list(range(7)))
    assert len(table[0]) == 2 and len(table[1]) == 2  # grown for length 20
    assert len(spec.rows) == 7 and spec.private == {1: [0, 1]}  # the compensation slot's block, the ring's
    for d, row in enumerate(spec.rows):
        assert row[0] == table[0]  # the full group: shared
        assert set(row[1]).isdisjoint(table[1]) and len(set(row[1])) == 2  # the window: its own copies
        assert all(set(row[1]).isdisjoint(other[1]) for other in spec.rows[d + 1 :])
    assert bm.pools["model"].num_used == 4 + 7 * 2
    kept = spec.rows[accepted - 1][1] if accepted else list(table[1])
    computed = 12 + 1 + accepted
    bm.commit(table, spec, accepted, computed)
    assert len(table[0]) == layout.levels[0].blocks(computed, BS)
    assert table[1] == kept[: layout.levels[1].blocks(computed, BS)]
    assert (
        bm.pools["model"].num_used
        == len(table[0]) + len(table[1])
        == bm.used_by_level["full"] + bm.used_by_level["window"]
    )


def test_a_verify_step_without_room_takes_nothing():
    bm = BlockManager(FULL_AND_WINDOW, {"model": 3}, BS)
    table = BlockTable()
    bm.allocate(table, 13)
    assert bm.speculate(table, 12, [1, 2, 3, 4, 5]) is None  # growth (1) + copies (5 rows x 1) > 1 free
    assert bm.pools["model"].num_used == 2 and len(table[0]) == 1
