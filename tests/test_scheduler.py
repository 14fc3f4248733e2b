"""Continuous batching and preemption on a tiny model."""

import random

import pytest

from atb_llm.cache.block_manager import BlockManager
from atb_llm.compression.layout import GroupLayout
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.scheduler import Scheduler
from atb_llm.runtime.sequence import SamplingParams, Sequence, SequenceStatus

BS = 16


def prompts(n, lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(2, 320) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


@pytest.fixture(scope="module")
def reference(tiny_models):
    path = tiny_models()
    ps = prompts(6, [5, 20, 33, 12])
    big = LLMEngine(EngineConfig(str(path), max_batch_size=6, block_size=16, max_output_length=40, progress=False))
    outs = big.generate(ps, SamplingParams(max_tokens=40, ignore_eos=True))
    return path, ps, [o.token_ids for o in outs]


def test_preemption_under_a_tiny_pool_gives_the_same_outputs(reference):
    path, ps, ref = reference
    # 2 groups x 2 layers; a 73-token sequence needs 5 blocks per group = 20 blocks: room for ~2 at a time
    engine = LLMEngine(
        EngineConfig(str(path), max_batch_size=6, block_size=16, max_output_length=40, num_blocks=44, progress=False)
    )
    outs = engine.generate(ps, SamplingParams(max_tokens=40, ignore_eos=True))
    assert [o.token_ids for o in outs] == ref
    assert sum(o.num_preemptions for o in outs) > 0  # the pool really was too small
    pool = engine.cache_manager.block_manager.pools["model"]
    assert pool.num_used == 0 and pool.num_free == 44


def test_requests_join_while_others_decode(reference):
    path, ps, ref = reference
    engine = LLMEngine(EngineConfig(str(path), max_batch_size=2, block_size=16, max_output_length=40, progress=False))
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    first = engine.add_request(ps[0], params)
    for _ in range(5):
        engine.step()
    second = engine.add_request(ps[1], params)
    assert engine.step() == [second]  # the newcomer is prefilled at once...
    assert engine.step() == [first, second]  # ...then decodes alongside
    assert len(first.output_token_ids) == 6 and len(second.output_token_ids) == 2
    while engine.has_unfinished():
        engine.step()
    assert first.output_token_ids == ref[0] and second.output_token_ids == ref[1]


def test_abort_frees_blocks_at_once(reference):
    path, ps, _ = reference
    engine = LLMEngine(EngineConfig(str(path), max_batch_size=4, block_size=16, max_output_length=40, progress=False))
    a = engine.add_request(ps[2], SamplingParams(max_tokens=40), request_id="a")
    engine.add_request(ps[3], SamplingParams(max_tokens=40), request_id="b")
    engine.step()
    pool = engine.cache_manager.block_manager.pools["model"]
    used = pool.num_used
    engine.abort("a")
    assert a.finish_reason == "abort" and pool.num_used == used - 4 * 3  # 4 groups x 3 blocks of 34 tokens
    while engine.has_unfinished():
        engine.step()
    assert pool.num_used == 0


# ---- preemption ---------------------------------------------------------------------------------
def full_pool_scheduler(num_blocks: int) -> Scheduler:
    """One group, `num_blocks` blocks of 16 tokens: a 16-token prompt takes one block, its 17th token a second."""
    return Scheduler(BlockManager(GroupLayout.uniform(1, 1), {"model": num_blocks}, BS), 8, 8192)


def run_prefill(sched: Scheduler, seqs: list[Sequence]) -> None:
    for s in seqs:
        sched.add(s)
    scheduled, is_prefill = sched.schedule()
    assert is_prefill and scheduled == seqs
    for s in seqs:
        s.num_computed_tokens = 16  # as the engine records the prefill
        s.output_token_ids.append(7)  # the prefill's token: each now needs a block for token 17


def test_preemption_takes_the_newest_and_requeues_it_ahead_of_later_arrivals():
    sched = full_pool_scheduler(3)
    a, b, c = (Sequence([1] * 16, SamplingParams(), request_id=x) for x in "abc")
    run_prefill(sched, [a, b, c])  # the pool is full
    d = Sequence([1] * 16, SamplingParams(), request_id="d")
    sched.add(d)  # arrives after a, b, c
    scheduled, is_prefill = sched.schedule()
    # a (oldest) grows into c's freed block; b cannot grow and no one newer is left: b goes too
    assert (scheduled, is_prefill) == ([a], False)
    assert [s.num_preemptions for s in (a, b, c, d)] == [0, 1, 1, 0] and sched.num_preemptions == 2
    assert [s.request_id for s in sched.waiting] == ["b", "c", "d"]  # preempted ones first, in arrival order
    assert b.status is c.status is SequenceStatus.WAITING and not any(b.block_table.rows)
    assert sched.block_manager.num_free() == {"model": 1}


def test_a_lone_sequence_that_cannot_grow_preempts_itself():
    sched = full_pool_scheduler(1)
    (a,) = seqs = [Sequence([1] * 16, SamplingParams(), request_id="a")]
    run_prefill(sched, seqs)
    assert sched.schedule() == ([], False)
    assert a.num_preemptions == 1 and list(sched.waiting) == [a]


# ---- admission ----------------------------------------------------------------------------------
def admitted(max_batch: int, budget: int, lengths: list[int]) -> list[int]:
    """Prompt tokens scheduled in the first step for prompts of `lengths`, queued in that order."""
    sched = Scheduler(BlockManager(GroupLayout.uniform(1, 1), {"model": 64}, BS), max_batch, budget)
    for n in lengths:
        sched.add(Sequence(list(range(2, 2 + n)), SamplingParams()))
    scheduled, is_prefill = sched.schedule()
    assert is_prefill and len(sched.running) == len(scheduled)
    return [s.num_scheduled_tokens for s in scheduled]


def test_admission_stops_at_the_batch_size_and_the_prefill_budget():
    assert admitted(2, 1000, [5, 5, 5]) == [5, 5]  # the batch is full
    assert admitted(3, 32, [16, 16, 16]) == [16, 16]  # an exact fit is admitted, then the budget is spent
    assert admitted(3, 32, [16, 17, 1]) == [16]  # in order: the one that does not fit stops the others
    assert admitted(3, 8, [20, 5]) == [20]  # the first prompt goes in whatever its length


def test_admission_counts_the_blocks_a_cached_prefix_saves():
    """A 6-block pool: a holds 4 blocks; b shares a's first 3 and needs 2 of its own, which fit."""
    sched = Scheduler(BlockManager(GroupLayout.uniform(1, 1), {"model": 6}, BS, prefix_caching=True), 8, 8192)
    a = Sequence(list(range(2, 66)), SamplingParams())
    sched.add(a)
    assert sched.schedule() == ([a], True)
    a.num_computed_tokens = 64
    sched.block_manager.cache(a.block_table, a.token_ids, 64)  # as the engine records a finished prefill
    b = Sequence(list(range(2, 50)) + [1] * 20, SamplingParams())
    sched.add(b)
    assert sched.schedule() == ([b], True)
    assert (b.num_computed_tokens, b.num_scheduled_tokens) == (48, 20)
    assert b.block_table[0][:3] == a.block_table[0][:3] and sched.block_manager.num_free() == {"model": 0}


def test_siblings_of_a_one_token_prompt_start_together_with_nothing_to_share():
    sched = full_pool_scheduler(8)
    a, b = Sequence([5], SamplingParams()), Sequence([5], SamplingParams())
    sched.add(a)
    sched.add(b, sibling_of=a)
    assert sched.schedule() == ([a, b], True) and a.fork_at == 0 and not sched.siblings


def test_preempted_sequences_come_back_with_their_tokens(tiny_models):
    """Exact preemption counts on a real engine: three 16-token prompts in a 4-group, 12-block pool."""
    engine = LLMEngine(
        EngineConfig(str(tiny_models()), block_size=BS, max_input_length=64, max_output_length=8, num_blocks=12,
                     max_batch_size=3, progress=False),
    )  # fmt: skip
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    alone = [engine.generate([[i + 2] * 16], params)[0].token_ids for i in range(3)]
    outs = engine.generate([[i + 2] * 16 for i in range(3)], params)
    assert [o.token_ids for o in outs] == alone
    assert [o.num_preemptions for o in outs] == [0, 1, 1]  # the newest two step aside once each
