"""MLGC in whole blocks: window rings stay fixed, the pools hold exactly what the plan predicts."""

import math

import torch

from atb_llm.cache.cache_manager import CacheConfig, CacheManager
from atb_llm.compression.layout import GroupLayout
from atb_llm.compression.levels import FullInt8, Level, Window, WindowInt8
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams

BS = 16
WINDOW = Window(sink=4, recent=27)  # 4 + 27 + 1 = 32 slots: a ring of exactly 2 blocks
LAYOUT = GroupLayout(2, 2, (Level(), WINDOW, WINDOW, WINDOW))  # one full group, three window groups


def expected_blocks(n: int) -> int:
    """Written out independently of the block manager: 1 full group + 3 ring-capped window groups."""
    full = math.ceil(n / BS)
    window_slots = n if n <= 4 else min(n + 1, 32)
    return full + 3 * math.ceil(window_slots / BS)


def test_long_generation_holds_exactly_the_predicted_blocks(tiny_models):
    engine = LLMEngine(
        EngineConfig(str(tiny_models()), block_size=BS, max_input_length=64, max_output_length=128, progress=False),
        layout=LAYOUT,
    )
    pool = engine.cache_manager.block_manager.pools["model"]
    seq = engine.add_request(list(range(2, 22)), SamplingParams(max_tokens=120, ignore_eos=True))
    while not seq.is_finished:
        engine.step()
        if seq.is_finished:
            break
        held = seq.num_tokens - 1  # the last sampled token is written by the next step
        assert pool.num_used == expected_blocks(held)
        assert all(len(seq.block_table[g]) <= 2 for g in (1, 2, 3))  # a window group never exceeds its ring
    assert pool.num_used == 0 and pool.num_free == pool.num_blocks  # all returned, once
    assert engine.cache_manager.usage_by_level()["window"]["blocks_peak"] == 3 * 2


def test_int8_groups_draw_on_their_own_pool(tiny_models):
    layout = GroupLayout(2, 2, (Level(), WindowInt8(4, 27), Level(), WindowInt8(4, 27)))
    engine = LLMEngine(
        EngineConfig(str(tiny_models()), block_size=BS, max_input_length=64, max_output_length=64, progress=False),
        layout=layout,
    )
    seq = engine.add_request(list(range(2, 52)), SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()
    pools = engine.cache_manager.block_manager.pools
    assert pools["model"].num_used == 2 * math.ceil(50 / BS) and pools["int8"].num_used == 2 * 2
    usage = engine.cache_manager.usage_by_level()
    assert usage["window_int8"]["bytes_used"] == 4 * 2 * BS * (16 + 4)  # head_dim 16: int8 K, V + fp32 scales
    while engine.has_unfinished():
        engine.step()
    assert seq.is_finished and pools["int8"].num_used == 0


def test_compression_admits_more_sequences_into_the_same_pool(tiny_models):
    def admitted(layout):
        engine = LLMEngine(
            EngineConfig(
                str(tiny_models()),
                block_size=BS,
                max_batch_size=16,
                max_input_length=128,
                max_output_length=8,
                num_blocks=60,
                progress=False,
            ),
            layout=layout,
        )
        for _ in range(16):
            engine.add_request(list(range(2, 102)), SamplingParams(max_tokens=8, ignore_eos=True))
        seqs, is_prefill = engine.scheduler.schedule()
        assert is_prefill
        return len(seqs)

    # 100-token prompts: 4 full groups x 7 blocks = 28 per sequence; with LAYOUT 7 + 3 x 2 = 13
    full = admitted(GroupLayout.uniform(2, 2))
    assert full == 60 // 28
    assert admitted(LAYOUT) == 60 // 13


def test_qwen25_7b_at_32k_with_a_quarter_full_is_under_30_percent(tmp_path):
    import json
    from pathlib import Path

    import torch

    from atb_llm.compression.memory import kv_bytes, sequences_that_fit
    from atb_llm.compression.plan import baseline_plan
    from atb_llm.models.qwen2_mlgc.config_qwen2_mlgc import load_qwen2_config

    src = Path(__file__).parents[1] / "examples/models/qwen2_5_mlgc/configs/qwen2.5-7b-instruct.json"
    (tmp_path / "config.json").write_text(json.dumps(json.loads(src.read_text())))
    config = load_qwen2_config(tmp_path)
    plan = baseline_plan("random", config, 128, sink=64, recent=1024, full_ratio=0.25)
    assert plan.counts() == {"full": 28, "window": 84} and plan.recent == 1087
    block = 2 * 128 * 128 * 2  # K and V, 128 tokens x head_dim 128, bf16
    mlgc = kv_bytes(plan.to_layout(), 32768, 128, torch.bfloat16, 128)
    full = kv_bytes(GroupLayout.uniform(28, 4), 32768, 128, torch.bfloat16, 128)
    assert full == 112 * 256 * block and mlgc == (28 * 256 + 84 * 9) * block
    assert mlgc / full < 0.30
    budget = 16 * 2**30
    assert sequences_that_fit(plan.to_layout(), budget, 32768, 128, torch.bfloat16, 128) == budget // mlgc == 33


def cache_manager(layout: GroupLayout, **cfg) -> CacheManager:
    """Blocks of 16 tokens, head_dim 8, fp32, one sequence of up to 64 tokens (pools from `cfg`)."""
    return CacheManager(layout, CacheConfig(16, **cfg), 8, torch.float32, 1, 64)


def test_longest_sequence_is_the_most_tokens_that_fit():
    mixed = GroupLayout(2, 2, (Level(), Window(sink=4, recent=27), WindowInt8(sink=4, recent=27), Level()))
    for layout in (GroupLayout.uniform(2, 2), mixed):
        for num_blocks in (1, 3, 7, 10):
            cm = cache_manager(layout, num_blocks=num_blocks)
            for limit in (1, 40, 111, 400):
                want = max(n for n in range(limit + 1) if cm.fits_alone(n))
                assert cm.longest_sequence(limit) == want, (layout.levels, num_blocks, limit)
    # a window group stops growing: the mixed layout holds more tokens in the same blocks
    assert cm.longest_sequence(400) > cache_manager(GroupLayout.uniform(2, 2), num_blocks=10).longest_sequence(400)


def test_pools_are_sized_in_proportion_to_a_sequences_needs():
    """num_blocks sizes the model-dtype pool (the int8 pool in proportion, or alone when every group
    is int8); memory_gb fills the budget with whole sequences' worth of each pool."""
    mixed = GroupLayout(2, 2, (FullInt8(), Level(), Window(sink=4, recent=27), FullInt8()))

    cm = cache_manager(mixed, num_blocks=10)
    assert cm.num_blocks == {"int8": round(10 * cm.per_sequence["int8"] / cm.per_sequence["model"]), "model": 10}
    assert cache_manager(GroupLayout.uniform(2, 2, FullInt8()), num_blocks=10).num_blocks == {"int8": 10}
    budget = 2**20
    cm = cache_manager(mixed, memory_gb=budget / 2**30)
    seq_bytes = sum(n * cm.bytes_per_block(p) for p, n in cm.per_sequence.items())
    assert budget - seq_bytes < cm.total_bytes <= budget
    sequences = {p: cm.num_blocks[p] / n for p, n in cm.per_sequence.items()}
    assert max(sequences.values()) - min(sequences.values()) < 1  # the same number of sequences in each pool
