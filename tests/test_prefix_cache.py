"""Prefix caching in the engine: a prompt starting with blocks computed before shares them and
computes only the rest, with the same greedy output as without the cache."""

import random

import pytest

from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams

BS = 16


def engine(path, prefix: bool, layout=None, **kw) -> LLMEngine:
    cfg = EngineConfig(
        str(path), block_size=BS, max_input_length=160, max_output_length=16, prefix_caching=prefix,
        progress=False, **kw,
    )  # fmt: skip
    return LLMEngine(cfg, layout=layout)


def prompts_with_shared_start(n, shared=70, own=(5, 20, 1, 33), seed=0):
    rng = random.Random(seed)
    system = [rng.randrange(2, 320) for _ in range(shared)]
    return [system + [rng.randrange(2, 320) for _ in range(own[i % len(own)])] for i in range(n)]


@pytest.mark.parametrize("chunked", [False, True])
def test_outputs_equal_with_and_without_the_cache(tiny_models, chunked):
    path = tiny_models()
    prompts = prompts_with_shared_start(6)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    kw = dict(chunked_prefill=chunked, max_prefill_tokens=32)
    want = [o.token_ids for o in engine(path, False, **kw).generate(prompts, params)]
    eng = engine(path, True, **kw)
    first = eng.generate(prompts[:1], params)  # computes and caches the shared 64 tokens (4 blocks)
    rest = eng.generate(prompts[1:], params)
    assert [o.token_ids for o in first + rest] == want
    prefix = eng.cache_manager.block_manager.prefix
    assert prefix.hit_tokens == 5 * 64  # every later prompt found the 4 shared blocks
    pool = eng.cache_manager.block_manager.pools["model"]
    assert pool.num_used == 0 and pool.num_free == pool.num_blocks


def test_a_repeated_prompt_computes_only_its_last_block(tiny_models):
    eng = engine(tiny_models(), True)
    prompt = prompts_with_shared_start(1, shared=64, own=(0,))[0]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    (a,) = eng.generate([prompt], params)
    seq = eng.add_request(prompt, params)
    eng.scheduler.schedule()
    assert seq.num_computed_tokens == 48 and seq.num_scheduled_tokens == 16
    eng.abort(seq.request_id)
    assert eng.generate([prompt], params)[0].token_ids == a.token_ids


def test_prompt_logprobs_are_computed_for_every_position(tiny_models):
    eng = engine(tiny_models(), True)
    prompt = prompts_with_shared_start(1, shared=64, own=(3,))[0]
    eng.generate([prompt], SamplingParams(max_tokens=2))
    (out,) = eng.generate([prompt], SamplingParams(max_tokens=2, prompt_logprobs=0))
    assert len(out.prompt_logprobs) == len(prompt) and all(lp is not None for lp in out.prompt_logprobs[1:])


def test_preemption_with_the_cache_gives_the_same_outputs(tiny_models):
    path = tiny_models()
    prompts = prompts_with_shared_start(5, shared=40)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    want = [o.token_ids for o in engine(path, False, max_batch_size=5).generate(prompts, params)]
    eng = engine(path, True, max_batch_size=5, num_blocks=28)  # 4 groups x 7 blocks: about one at a time
    outs = eng.generate(prompts, params)
    assert [o.token_ids for o in outs] == want
    assert sum(o.num_preemptions for o in outs) > 0
    assert eng.cache_manager.block_manager.num_used() == {"model": 0}


# ---- with MLGC window groups ---------------------------------------------------------------------
def window_layout():
    from atb_llm.compression.layout import GroupLayout
    from atb_llm.compression.levels import FullInt8, Level, Window, WindowInt8

    return GroupLayout(2, 2, (Level(), Window(sink=4, recent=12), WindowInt8(sink=4, recent=12), FullInt8()))


@pytest.mark.parametrize("chunked", [False, True])
def test_window_groups_reuse_a_snapshot_taken_where_requests_met(tiny_models, chunked):
    """Request 1 computes its prompt; request 2 matches it in the full groups only, so it computes
    its prompt in two parts and snapshots the window groups between them; request 3 takes the full
    groups' blocks and a copy of the snapshot, and gives exactly request 2's output (both saw the
    shared part as an earlier chunk), and the cache-off engine splitting at the same point agrees."""
    path = tiny_models()
    p1, p2, p3 = prompts_with_shared_start(3, shared=70, own=(9, 20, 30))  # 4 shared blocks
    params = SamplingParams(max_tokens=10, ignore_eos=True, logprob_token_ids=(1, 2, 3))
    eng = engine(path, True, layout=window_layout(), chunked_prefill=chunked, max_prefill_tokens=64)
    eng.generate([p1], params)
    s2 = eng.add_request(p2, params)
    eng.step()
    assert s2.snapshot_at == 64 and s2.num_computed_tokens == 64 and not s2.output_token_ids  # first part
    while eng.has_unfinished():
        eng.step()
    prefix = eng.cache_manager.block_manager.prefix
    assert prefix.hit_tokens == 0
    (o3,) = eng.generate([p3], params)
    assert prefix.hit_tokens == 64
    # the same split without the cache: chunks of 64 tokens end exactly at the shared part
    ref = engine(path, False, layout=window_layout(), chunked_prefill=True, max_prefill_tokens=64)
    (want,) = ref.generate([p3], params)
    assert o3.token_ids == want.token_ids
    for a, b in zip(o3.logprobs, want.logprobs):
        assert max(abs(a[t] - b[t]) for t in a) < 2e-2  # int8 groups: the snapshot holds quantized values
    bm = eng.cache_manager.block_manager
    assert bm.num_used() == {"model": 0, "int8": 0} and not bm.copies


def test_window_snapshots_are_evicted_least_recently_used_first(tiny_models):
    eng = engine(tiny_models(), True, layout=window_layout(), num_blocks=40)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    pairs = [prompts_with_shared_start(2, shared=64, own=(3, 5), seed=seed) for seed in range(6)]
    for first, second in pairs:  # each pair shares 64 tokens: one snapshot each, more than the pools hold
        eng.generate([first], params)
        eng.generate([second], params)
    prefix = eng.cache_manager.block_manager.prefix
    usable, matched = prefix.match(pairs[0][1], 4)
    assert usable == [] and matched < 4  # the oldest pair's snapshot and last blocks are gone (last first)
    newest, matched = prefix.match(pairs[-1][1], 4)
    assert matched == 4 and newest[-1].snapshot is not None
    bm = eng.cache_manager.block_manager
    assert bm.num_used() == {"model": 0, "int8": 0}
    for pool in bm.pools.values():
        assert pool.num_free == pool.num_blocks == pool.num_clean + pool.num_idle


def test_server_reports_prefix_cache_hits(tiny_models):
    import httpx
    from server_util import metrics, running_server

    prompt = "the quick brown fox jumps over the lazy dog " * 8
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0}
    with running_server(tiny_models(), block_size=16, prefix_caching=True, chunked_prefill=True) as server:
        before = metrics(server.url)  # after the server's warm-up request
        texts = [httpx.post(server.url + "/v1/completions", json=body, timeout=60).json() for _ in range(2)]
        m = metrics(server.url)
    assert texts[0]["choices"][0]["text"] == texts[1]["choices"][0]["text"]
    n = texts[0]["usage"]["prompt_tokens"]
    queries, hits = (
        m[k] - before[k] for k in ("atb_llm_prefix_cache_queries_total", "atb_llm_prefix_cache_hits_total")
    )
    assert queries == 2 * n and hits == (n - 1) // 16 * 16 > 0
    assert m["atb_llm_prefix_cache_blocks"] >= 4 * ((n - 1) // 16)  # 4 groups


@pytest.mark.parametrize("at", [0, 15, 48, 63])
def test_a_prompt_differing_at_a_blocks_first_or_last_token_reuses_only_the_blocks_before(tiny_models, at):
    """Blocks of 16: a change at token 48 or 63 (the first and last of block 3) keeps blocks 0-2,
    at token 0 or 15 (block 0) none; the output equals the cache-off engine's."""
    path = tiny_models()
    (first,) = prompts_with_shared_start(1, shared=64, own=(8,))
    second = list(first)
    second[at] = second[at] % 300 + 3  # another token there
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    eng = engine(path, True)
    eng.generate([first], params)
    (got,) = eng.generate([second], params)
    assert eng.cache_manager.block_manager.prefix.hit_tokens == 16 * (at // 16)
    assert got.token_ids == engine(path, False).generate([second], params)[0].token_ids
