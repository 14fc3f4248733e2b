"""MLGC levels: invariants against the uncompressed cache and a direct computation."""

import math

import pytest
import torch

from atb_llm.cache.cache_manager import CacheConfig, CacheManager
from atb_llm.compression.layout import GroupLayout
from atb_llm.compression.levels import FullInt8, Level, Window, WindowInt8
from atb_llm.layers.attention.metadata import AttentionMetadata
from atb_llm.layers.attention.torch_backend import TorchBackend
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams, Sequence

COVERING = {  # sink + recent covers the 60 tokens of the test
    "full": Level(),
    "window": Window(sink=4, recent=100),
    "full_int8": FullInt8(),
    "window_int8": WindowInt8(sink=4, recent=100),
}
INT8_TOL = 0.15  # int8 K/V (per-token scales): max |logit difference| on the tiny model (logits within ±4)
INT8_MEAN_TOL = 0.02  # ... and mean |logit difference|


def forced_logits(path, layout, prompt, forced, block_size=16):
    """Logits of the prefill and every decode step, with the tokens forced."""
    engine = LLMEngine(
        EngineConfig(str(path), block_size=block_size, max_input_length=256, max_output_length=64, progress=False),
        layout=layout,
    )
    rows, model = [], engine.runner.model

    def spy(*args):  # the forward contract: one logits row per sequence here
        out = model(*args)
        rows.append(out[0].clone())
        return out

    engine.runner.model = spy
    engine.generate([prompt], SamplingParams(force_tokens=tuple(forced)))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def setup(tiny_models):
    path = tiny_models()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, 320, (40,), generator=g).tolist()
    forced = torch.randint(2, 320, (20,), generator=g).tolist()
    ref = forced_logits(path, GroupLayout.uniform(2, 2), prompt, forced)
    return path, prompt, forced, ref


@pytest.mark.parametrize("name", list(COVERING))
def test_every_level_matches_the_full_cache_when_the_window_covers_the_sequence(setup, name):
    path, prompt, forced, ref = setup
    got = forced_logits(path, GroupLayout.uniform(2, 2, COVERING[name]), prompt, forced)
    diff = (got - ref).abs()
    if COVERING[name].int8:
        assert diff.max().item() < INT8_TOL and diff.mean().item() < INT8_MEAN_TOL
    else:
        assert diff.max().item() < 1e-4
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_mixed_levels_in_one_layer(setup):
    path, prompt, forced, ref = setup
    mixed = GroupLayout(2, 2, (Level(), COVERING["window"], COVERING["window_int8"], FullInt8()))
    diff = (forced_logits(path, mixed, prompt, forced) - ref).abs()
    assert diff.max().item() < INT8_TOL and diff.mean().item() < INT8_MEAN_TOL


def test_a_small_window_changes_decode_but_not_prefill(setup):
    path, prompt, forced, ref = setup
    got = forced_logits(path, GroupLayout.uniform(2, 2, Window(sink=2, recent=8)), prompt, forced)
    assert torch.allclose(got[0], ref[0], atol=1e-5)  # prefill attends over the whole prompt
    assert (got[1:] - ref[1:]).abs().max().item() > 1e-2  # decode reads only what the window keeps


# ---- decode against a direct computation over the kept tokens + compensation slot ----------


def direct_attention(q, keys, values, sink, recent, scale):
    """q: [Hq, D]; keys, values: [n, Hkv, D] (all tokens so far) -> [Hq, D]."""
    n, hkv, _ = keys.shape
    kept = list(range(min(sink, n))) + list(range(max(sink, n - recent), n))
    evicted = list(range(sink, max(sink, n - recent)))
    k, v = keys[kept], values[kept]
    if evicted:
        k = torch.cat([k, keys[evicted].mean(0, keepdim=True)])
        v = torch.cat([v, values[evicted].mean(0, keepdim=True)])
    rep = q.shape[0] // hkv
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # [m, Hq, D]
    logits = torch.einsum("hd,mhd->hm", q, k) * scale
    if evicted:
        logits[:, -1] += math.log(len(evicted))
    return torch.einsum("hm,mhd->hd", logits.softmax(-1), v)


@pytest.mark.parametrize("level, tol", [(Window(sink=3, recent=5), 1e-5), (WindowInt8(sink=3, recent=5), 3e-2)])
def test_decode_equals_direct_computation_over_kept_tokens(level, tol):
    torch.manual_seed(0)
    hq, hkv, d, bs = 4, 2, 8, 16
    layout = GroupLayout.uniform(1, hkv, level)
    cm = CacheManager(layout, CacheConfig(block_size=bs), d, torch.float32, max_batch_size=1, max_seq_len=64)
    seq = Sequence(list(range(20)), SamplingParams(max_tokens=30))
    cm.block_manager.allocate(seq.block_table, seq.num_tokens)
    keys, values = torch.randn(20, hkv, d), torch.randn(20, hkv, d)

    def step_meta(is_prefill, positions):
        n = torch.tensor([seq.num_tokens])
        tables = cm.block_tables([seq.block_table])
        slots = cm.slots(tables, torch.zeros(len(positions), dtype=torch.int64), positions, n)
        return AttentionMetadata.build(is_prefill, tables, slots, n, seq.num_tokens, bs, torch.float32)

    cm.kv_cache.store(0, keys, values, step_meta(True, torch.arange(20)))
    backend, scale = TorchBackend(), d**-0.5
    for _ in range(12):  # every step evicts one more token into the compensation slot
        k, v = torch.randn(1, hkv, d), torch.randn(1, hkv, d)
        seq.output_token_ids.append(0)
        cm.block_manager.may_append(seq.block_table, seq.num_tokens)
        meta = step_meta(False, torch.tensor([seq.num_tokens - 1]))
        cm.kv_cache.store(0, k, v, meta)
        keys, values = torch.cat([keys, k]), torch.cat([values, v])
        q = torch.randn(1, hq, d)
        got = backend.decode(q, cm.kv_cache, 0, meta, scale)[0]
        want = direct_attention(q[0], keys, values, level.sink, level.recent, scale)
        assert (got - want).abs().max().item() < tol
    assert len(seq.block_table[0]) == 1  # the ring: ceil((3 + 5 + 1) / 16) blocks, whatever the length


def test_kv_quant_c8_stores_every_group_in_int8_at_its_own_geometry(tiny_models):
    layout = GroupLayout(2, 2, (Level(), Window(sink=4, recent=27), FullInt8(), WindowInt8(sink=2, recent=13)))
    engine = LLMEngine(
        EngineConfig(str(tiny_models()), dtype="fp32", block_size=16, num_blocks=64, kv_quant="c8", progress=False),
        layout=layout,
    )
    int8 = (FullInt8(), WindowInt8(sink=4, recent=27), FullInt8(), WindowInt8(sink=2, recent=13))
    assert engine.layout == GroupLayout(2, 2, int8)
    assert all(pool.is_int8 for pool in engine.cache_manager.kv_cache.pools.values())
