"""MLGC levels: invariants against the uncompressed cache and a direct computation."""

import math

import pytest
import torch
from levels import level_table

from atb_llm.cache.cache_manager import CacheConfig, CacheManager
from atb_llm.cache.kv_cache import KVPool
from atb_llm.compression.layout import GroupLayout
from atb_llm.compression.levels import INT8_STORAGE, MODEL_STORAGE, FullInt8, Level, Window, WindowInt8
from atb_llm.layers.attention import kv_write
from atb_llm.layers.attention.metadata import AttentionMetadata
from atb_llm.layers.attention.paged_attention import PagedAttention, load_kv_cache_scale
from atb_llm.layers.attention.torch_backend import TorchBackend
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams, Sequence

BS = 16


COVERING = {level.name: level for level in level_table(4, 100)}  # sink + recent covers the 60 tokens of the test
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


@pytest.mark.parametrize(
    "level, tol", [(lv, 3e-2 if lv.int8 else 1e-5) for lv in level_table(3, 5) if lv.comp_slot is not None]
)
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

    kv_write.store(cm.kv_cache, 0, keys, values, step_meta(True, torch.arange(20)))
    backend, scale = TorchBackend(), d**-0.5
    for _ in range(12):  # every step evicts one more token into the compensation slot
        k, v = torch.randn(1, hkv, d), torch.randn(1, hkv, d)
        seq.output_token_ids.append(0)
        cm.block_manager.may_append(seq.block_table, seq.num_tokens)
        meta = step_meta(False, torch.tensor([seq.num_tokens - 1]))
        kv_write.store(cm.kv_cache, 0, k, v, meta)
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


# ---- C8 channel scales: smoothing before the int8 cache ---------------------------------------


@pytest.mark.parametrize("level", level_table(3, 5))
def test_c8_channel_scales_shrink_the_int8_error_and_change_nothing_in_float(level):
    """Keys and values with a few outlier channels (20x the rest), as real ones have: with the checkpoint's
    per-channel scales the layer divides them out before the cache (and multiplies the queries and
    the output back). Float levels give the same outputs; int8 levels a several times smaller error
    against the direct computation in fp32 over 12 decode steps; prefill attends over the float K/V,
    the same with or without."""
    torch.manual_seed(0)
    hq, hkv, d, bs, n0 = 4, 2, 64, 16, 20
    chan = torch.ones(d)
    chan[[2, 2 + d // 2, 5]] = 20.0  # one rotary pair and one lone channel
    keys, values = torch.randn(n0 + 12, hkv, d) * chan, torch.randn(n0 + 12, hkv, d) * chan.flip(0)
    queries = torch.randn(n0 + 12, hq, d)
    # the checkpoint's scales, per channel before RoPE; the layer pairs the key scales itself
    ckpt = {"k": (chan / 20).repeat(hkv), "v": (chan.flip(0) / 20).repeat(hkv)}
    layers = {}
    for smooth in (False, True):
        layer = PagedAttention(0, d**-0.5, TorchBackend(), hkv, d, kv_cache_scales=smooth)
        if smooth:
            for shard, s in ckpt.items():
                load_kv_cache_scale(layer.kv_scale, s, f"k_proj.kv_cache_scale ({shard})", shard)
        layers[smooth] = layer
    half = d // 2
    paired = (ckpt["k"].view(hkv, d)[:, :half] ** 2 + ckpt["k"].view(hkv, d)[:, half:] ** 2).sqrt()
    assert torch.equal(layers[True].kv_scale[0], torch.cat([paired, paired], -1))
    assert torch.equal(layers[True].kv_scale[1], ckpt["v"].view(hkv, d))

    outputs = {}  # smooth -> [prefill output, then each decode step's]
    for smooth, layer in layers.items():
        layout = GroupLayout.uniform(1, hkv, level)
        cm = CacheManager(layout, CacheConfig(block_size=bs), d, torch.float32, max_batch_size=1, max_seq_len=64)
        seq = Sequence(list(range(n0)), SamplingParams(max_tokens=30))
        cm.block_manager.allocate(seq.block_table, seq.num_tokens)

        def step_meta(is_prefill, positions, cm=cm, seq=seq):
            n = torch.tensor([seq.num_tokens])
            tables = cm.block_tables([seq.block_table])
            slots = cm.slots(tables, torch.zeros(len(positions), dtype=torch.int64), positions, n)
            return AttentionMetadata.build(is_prefill, tables, slots, n, seq.num_tokens, bs, torch.float32)

        outs = [layer(queries[:n0], keys[:n0], values[:n0], cm.kv_cache, step_meta(True, torch.arange(n0)))]
        for t in range(n0, n0 + 12):
            seq.output_token_ids.append(0)
            cm.block_manager.may_append(seq.block_table, seq.num_tokens)
            meta = step_meta(False, torch.tensor([t]))
            outs.append(layer(queries[t : t + 1], keys[t : t + 1], values[t : t + 1], cm.kv_cache, meta))
        outputs[smooth] = outs
    sink, recent = (level.sink, level.recent) if isinstance(level, Window) else (64, 64)
    steps = range(n0, n0 + 12)
    want = [direct_attention(queries[t], keys[: t + 1], values[: t + 1], sink, recent, d**-0.5) for t in steps]
    err = {s: torch.stack([(o[0] - w).norm() / w.norm() for o, w in zip(out[1:], want)]) for s, out in outputs.items()}
    assert torch.allclose(outputs[True][0], outputs[False][0], atol=1e-5)  # prefill attends over float K/V
    if not level.int8:
        assert err[True].max() < 1e-5 and err[False].max() < 1e-5
    else:
        assert err[True].mean() < err[False].mean() / 2  # measured: 0.32x (full_int8), 0.30x (window_int8)


def test_c8_channel_scales_leave_dead_channels_alone_and_check_their_size():
    """msModelSlim writes scale 0 for a channel that never moved; 0 or NaN must not divide K/V."""
    layer = PagedAttention(0, 1.0, TorchBackend(), 1, 4, kv_cache_scales=True)
    load_kv_cache_scale(layer.kv_scale, torch.tensor([0.0, 2.0, 0.0, float("nan")]), "k", "k")
    load_kv_cache_scale(layer.kv_scale, torch.tensor([0.0, 2.0, -1.0, float("inf")]), "v", "v")
    assert layer.kv_scale.tolist() == [[[1.0, 1.0, 1.0, 1.0]], [[1.0, 2.0, 1.0, 1.0]]]  # pairs (0, 2), (1, 3)
    load_kv_cache_scale(layer.kv_scale, torch.tensor([3.0, 0.0, 4.0, 1.0]), "k", "k")
    assert layer.kv_scale[0].tolist() == [[5.0, 1.0, 5.0, 1.0]]
    with pytest.raises(ValueError, match=r"layers.3.self_attn.v_proj.kv_cache_scale has 6 values .* \(1, 4\)"):
        load_kv_cache_scale(layer.kv_scale, torch.ones(6), "layers.3.self_attn.v_proj.kv_cache_scale", "v")


def test_int8_levels_without_c8_scales_measure_them_on_a_probe_at_load(tiny_models):
    """A float model whose layout has int8 groups: the engine prefills one prompt of 256 random
    tokens at load and takes each layer's channel scales from its keys (after RoPE, the largest norm
    of each rotary pair) and values (largest |v|), / 127: the same numbers as transformers' K/V on
    that prompt, whatever the input limit or chunking. The probe leaves no block taken and nothing
    in the prefix cache."""
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    path = tiny_models()
    layout = GroupLayout(2, 2, (Level(), FullInt8(), Window(sink=4, recent=27), WindowInt8(sink=2, recent=13)))
    cfg = EngineConfig(
        str(path), dtype="fp32", block_size=16, num_blocks=64, max_input_length=32, prefix_caching=True,
        chunked_prefill=True, max_prefill_tokens=8, progress=False,
    )  # fmt: skip
    engine = LLMEngine(cfg, layout=layout)
    n = 256
    probe = torch.randint(100, engine.model_config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    seen = {}
    for i, layer in enumerate(hf.model.layers):
        for proj in ("k_proj", "v_proj"):
            getattr(layer.self_attn, proj).register_forward_hook(lambda m, a, o, key=(i, proj): seen.setdefault(key, o))
    with torch.no_grad():
        hf(probe)
    cos, sin = hf.model.rotary_emb(torch.zeros(1), torch.arange(n)[None])
    d = engine.model_config.head_dim
    for i, layer in enumerate(engine.model.model.layers):
        k = seen[i, "k_proj"].view(1, n, -1, d).transpose(1, 2)
        k = apply_rotary_pos_emb(k, k, cos, sin)[1][0].transpose(0, 1)  # [n, kv_heads, d]
        pair = (k[..., : d // 2] ** 2 + k[..., d // 2 :] ** 2).sqrt().amax(0)
        v = seen[i, "v_proj"].view(n, -1, d).abs().amax(0)
        got = layer.self_attn.attn.kv_scale
        assert torch.allclose(got[0], torch.cat([pair, pair], -1) / 127, rtol=1e-4)
        assert torch.allclose(got[1], v / 127, rtol=1e-4)
    load_kv_cache_scale(got, torch.ones(2 * d), "k_proj.kv_cache_scale", "k")  # still a parameter to load into
    bm = engine.cache_manager.block_manager
    assert all(p.num_used == 0 and p.num_idle == 0 for p in bm.pools.values())
    assert not bm.prefix.entries
    full = GroupLayout.uniform(2, 2)
    assert LLMEngine(cfg, layout=full).model.model.layers[0].self_attn.attn.kv_scale is None  # no int8: no probe


# ---- int8 storage against a reference written here -------------------------------------------------
def test_int8_storage_round_trip_equals_an_fp32_reference():
    torch.manual_seed(0)
    x = torch.randn(64, 128) * torch.logspace(-3, 2, 64)[:, None]  # rows over five decades
    x[3] = 0  # an all-zero token
    q, scale = WindowInt8.storage.quantize(x)
    ref_scale = x.abs().amax(-1) / 127
    ref_q = torch.where(ref_scale[:, None] > 0, torch.round(x / ref_scale[:, None].clamp(min=1e-30)), 0)
    assert q.dtype == torch.int8 and torch.equal(q.float(), ref_q)
    assert torch.allclose(scale[ref_scale > 0], ref_scale[ref_scale > 0])
    back = WindowInt8.storage.dequantize(q, scale, torch.float32)
    assert torch.all((back - x).abs() <= ref_scale[:, None] / 2 + 1e-6)  # half a step per token
    assert torch.equal(back[3], torch.zeros(128))


def test_a_layout_of_another_shape_is_refused(tiny):
    cfg = EngineConfig(str(tiny), block_size=BS, max_input_length=64, max_output_length=8, progress=False)
    with pytest.raises(ValueError, match=r"1 layers x 2 KV heads, the model 2 x 2; build it with GroupLayout"):
        LLMEngine(cfg, layout=GroupLayout.uniform(1, 2))


@pytest.mark.parametrize("int8", [False, True])
def test_a_pool_reads_back_what_it_wrote_in_the_asked_dtype(int8):
    pool = KVPool.allocate(4, 16, 32, torch.bfloat16, INT8_STORAGE if int8 else MODEL_STORAGE)
    torch.manual_seed(0)
    k, v, slots = torch.randn(5, 32), torch.randn(5, 32), torch.tensor([0, 17, 18, 40, 63])
    pool.write(slots, k, v)
    for dtype in (torch.float32, torch.bfloat16):
        rk, rv = pool.read(slots, dtype)
        assert rk.dtype == rv.dtype == dtype
        step = k.abs().amax(-1, keepdim=True) / 127 if int8 else k.abs() / 128  # int8 / bf16 rounding
        assert torch.all((rk.float() - k).abs() <= step) and not torch.equal(rk, rv)
