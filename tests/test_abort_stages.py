"""An abort at every stage of a request's life (waiting, mid-prefill, mid-decode, a parent before it
forks its siblings, between the two parts of a prompt that takes a prefix-cache snapshot): the
other requests get exactly what they get alone, every block comes back, and a later request with
the aborted one's prompt gets what it gets alone."""

import random

import pytest

from atb_llm.compression.layout import GroupLayout
from atb_llm.compression.levels import FullInt8, Level, Window, WindowInt8
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams

PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)
FULL = GroupLayout(2, 2, (Level(), FullInt8(), Level(), FullInt8()))  # every token kept: chunking is exact
WINDOWS = GroupLayout(2, 2, (Level(), Window(sink=4, recent=12), WindowInt8(sink=4, recent=12), FullInt8()))


def engine(path, layout):
    cfg = EngineConfig(str(path), block_size=16, max_input_length=160, max_output_length=16, prefix_caching=True,
                       chunked_prefill=True, max_prefill_tokens=32, max_batch_size=4, progress=False)  # fmt: skip
    return LLMEngine(cfg, layout=layout)


def prompts(seed=0):
    rng = random.Random(seed)
    shared = [rng.randrange(2, 320) for _ in range(64)]  # four blocks the victim and the later ones share
    own = lambda n: [rng.randrange(2, 320) for _ in range(n)]  # noqa: E731
    return own(70), shared + own(6), shared + own(9)  # other, victim, later


def alone(path, layout, prompt, parts=None):
    """The output of `prompt` alone; `parts`: computed in chunks ending at these lengths."""
    eng = engine(path, layout)
    if parts:  # the same split as when the victim's blocks are found in the cache
        eng.generate([prompt[:parts]], SamplingParams(max_tokens=1))
    return eng.generate([prompt], PARAMS)[0].token_ids


def step_until(eng, done, limit=50):
    for _ in range(limit):
        if done():
            return
        eng.step()
    raise AssertionError("the stage was never reached")


@pytest.mark.parametrize("stage", ["waiting", "mid_prefill", "mid_decode", "before_fork", "mid_snapshot"])
def test_an_abort_at_any_stage_harms_no_other_request(tiny_models, stage):
    path = tiny_models()
    layout = WINDOWS if stage == "mid_snapshot" else FULL
    other_p, victim_p, later_p = prompts()
    eng = engine(path, layout)
    if stage == "mid_snapshot":  # a request that shares the four blocks, so the victim snapshots after them
        eng.generate([later_p[:64] + [7, 7, 7]], SamplingParams(max_tokens=1))
    other = eng.add_request(other_p, PARAMS, "other")
    step_until(eng, lambda: other.output_token_ids)  # its prefill is its own: the victim changes none of it
    victim = eng.add_request(victim_p, PARAMS, "victim")
    sibling = eng.add_request(victim_p, PARAMS, "sibling", sibling_of="victim") if stage == "before_fork" else None
    if stage == "mid_prefill" or stage == "before_fork":
        step_until(eng, lambda: 0 < victim.num_computed_tokens < len(victim_p))
    elif stage == "mid_decode":
        step_until(eng, lambda: len(victim.output_token_ids) >= 2)
    elif stage == "mid_snapshot":
        step_until(eng, lambda: victim.num_computed_tokens == victim.snapshot_at == 64)
    eng.abort("victim")
    assert victim.finish_reason == "abort"
    while eng.has_unfinished():
        eng.step()
    assert other.output_token_ids == alone(path, layout, other_p)
    if sibling is not None:  # the sibling goes on alone, from its own copy or its own prefill
        assert sibling.output_token_ids == alone(path, layout, victim_p)
    assert eng.cache_manager.block_manager.num_used() == dict.fromkeys(eng.cache_manager.block_manager.pools, 0)
    (later,) = eng.generate([later_p], PARAMS)  # may reuse what the victim computed before it went
    split = 64 if stage == "mid_snapshot" else None  # windows: the cached part is an earlier chunk
    assert later.token_ids == alone(path, layout, later_p, split)
