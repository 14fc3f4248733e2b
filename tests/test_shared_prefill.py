"""One prefill, every cache: a prompt prefilled once and written again under another layout decodes
exactly as a real prefill under that layout does (fp32, every level, int8 levels included)."""

import pytest
import torch
from levels import level_table

from atb_llm.compression.layout import GroupLayout
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams
from atb_llm.runtime.shared_prefill import capture_prefills

PROMPTS = [[(13 * i + 7 * j) % 300 + 3 for j in range(n)] for i, n in enumerate((70, 45, 90))]
PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


def config(tiny, **kw) -> EngineConfig:
    return EngineConfig(str(tiny), dtype="fp32", block_size=16, max_input_length=96, max_output_length=12,
                        max_batch_size=2, progress=False, **kw)  # fmt: skip


def mixed_layout(levels) -> GroupLayout:
    return GroupLayout(2, 2, tuple(levels))  # the tiny model: 2 layers x 2 KV heads


@pytest.mark.parametrize(
    "levels",
    [level_table(4, 27), level_table(4, 27)[::-1], [level_table(4, 27)[1]] * 4, [level_table(8, 40)[2]] * 4],
    ids=["every-level", "every-level-reversed", "window-only", "wider-window"],
)
def test_replayed_prefill_decodes_as_a_real_prefill(tiny, levels):
    layout = mixed_layout(levels)
    real = LLMEngine(config(tiny), layout=layout).generate(PROMPTS, PARAMS)
    engine = LLMEngine(config(tiny))  # full cache, measures K/V scales before it captures
    prefilled = capture_prefills(engine, PROMPTS)
    assert [len(p.kv) for p in prefilled] == [2, 2, 2] and [p.kv[0][0].shape[0] for p in prefilled] == [70, 45, 90]
    engine.set_layout(layout)
    seqs = []
    for p in prefilled:
        if len(engine.scheduler.running) == engine.cfg.max_batch_size:
            while engine.scheduler.running:  # room for the next: finish these first
                engine.step()
        seqs.append(engine.add_prefilled(p, PARAMS))
    while engine.has_unfinished():
        engine.step()
    assert [s.output_token_ids for s in seqs] == [o.token_ids for o in real]
    assert all(u["blocks_used"] == 0 for u in engine.cache_manager.usage().values())


def test_a_full_batch_is_refused_and_the_engine_goes_on(tiny):
    engine = LLMEngine(config(tiny))
    prefilled = capture_prefills(engine, PROMPTS)
    engine.add_prefilled(prefilled[0], PARAMS)
    engine.add_prefilled(prefilled[1], PARAMS)
    with pytest.raises(RuntimeError, match="no room for a prefilled request now"):
        engine.add_prefilled(prefilled[2], PARAMS)
    while engine.has_unfinished():
        engine.step()
    (again,) = engine.generate([PROMPTS[2]], PARAMS)
    seq = engine.add_prefilled(prefilled[2], PARAMS)
    while engine.has_unfinished():
        engine.step()
    assert seq.output_token_ids == again.token_ids


def test_capture_needs_whole_prefills(tiny):
    with pytest.raises(ValueError, match="without --chunked_prefill and --prefix_caching"):
        capture_prefills(LLMEngine(config(tiny, prefix_caching=True)), PROMPTS)
    assert torch.is_tensor(capture_prefills(LLMEngine(config(tiny)), PROMPTS[:1])[0].kv[1][1])
