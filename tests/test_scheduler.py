"""Continuous batching and preemption on a tiny model."""

import random

import pytest

from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams


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
