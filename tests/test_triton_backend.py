"""The Triton backend equals the torch reference: decode and the cache write over every MLGC level,
block size and query heads per group, on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1,
set before triton is imported), and the tiny model end to end through the engine."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]')")
if os.environ["TRITON_INTERPRET"] != "1" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no GPU to run the kernels", allow_module_level=True)

from levels import LEVEL_NAMES

from atb_llm.cache.cache_manager import CacheConfig, CacheManager  # noqa: E402
from atb_llm.compression.layout import GroupLayout  # noqa: E402
from atb_llm.compression.levels import make_level  # noqa: E402
from atb_llm.layers.attention.metadata import AttentionMetadata  # noqa: E402
from atb_llm.layers.attention.selector import get_backend  # noqa: E402
from atb_llm.layers.attention.torch_backend import TorchBackend  # noqa: E402
from atb_llm.layers.attention.triton_backend import TritonBackend  # noqa: E402
from atb_llm.runtime.engine import EngineConfig, LLMEngine  # noqa: E402
from atb_llm.runtime.model_runner import ModelRunner  # noqa: E402
from atb_llm.runtime.sequence import SamplingParams, Sequence  # noqa: E402

LEVELS = LEVEL_NAMES
SINK, RECENT = 4, 24  # window capacity 29 slots
# 5 tokens: less than a block, the compensation slot read but masked (nothing evicted); 29: the
# first token evicted; 41 and 150: the ring wrapped, 150 spans two blocks of 128.
LENGTHS = [5, 29, 41, 150]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}
SPLITTING = TritonBackend(split_slots=16, programs=1024)  # forces the split-context path


def levels(*names):
    return [make_level(n, SINK, RECENT) for n in names]


def build_step(heads, lengths, block_size, head_dim, dtype, is_prefill, layers=1, seed=0):
    """A cache whose pools hold random K/V, block tables and slots from the cache manager for
    sequences of `lengths` tokens (this step's included), and the step's metadata."""
    layout = GroupLayout(layers, len(heads), tuple(heads) * layers)
    cm = CacheManager(layout, CacheConfig(block_size), head_dim, dtype, len(lengths), max(lengths))
    seqs = []
    for n in lengths:
        s = Sequence(list(range(n if is_prefill else n - 1)), SamplingParams())
        if not is_prefill:
            s.output_token_ids.append(0)
        cm.block_manager.allocate(s.block_table, s.num_tokens)
        seqs.append(s)
    a = ModelRunner(None, cm).prepare(seqs, is_prefill).forward
    meta = AttentionMetadata.build(
        is_prefill, a.block_tables, a.slots, a.input_lengths, a.max_seq_len, block_size, dtype
    )
    g = torch.Generator().manual_seed(seed)
    for pool in cm.kv_cache.pools.values():
        if pool.is_int8:
            for t in (pool.k, pool.v):
                t.copy_(torch.randint(-127, 128, t.shape, generator=g, dtype=torch.int8))
            for t in (pool.k_scale, pool.v_scale):
                t.copy_(torch.rand(t.shape, generator=g) * 0.02 + 0.005)
        else:
            for t in (pool.k, pool.v):
                t.copy_(torch.randn(t.shape, generator=g))
    return cm.kv_cache, meta, g


def assert_pools_equal(got, want, exact=True):
    for name, w in want.pools.items():
        p = got.pools[name]
        pairs = [(p.k, w.k), (p.v, w.v)] + ([(p.k_scale, w.k_scale), (p.v_scale, w.v_scale)] if w.is_int8 else [])
        for x, y in pairs:
            if exact:
                assert torch.equal(x, y), f"pool {name}: {(x.float() - y.float()).abs().max()} off"
            else:
                torch.testing.assert_close(x.float(), y.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("gq", [2, 7])
@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("level", LEVELS)
def test_decode_matches_reference(level, block_size, gq):
    kv, meta, g = build_step(levels(level, level), LENGTHS, block_size, 64, torch.float32, is_prefill=False)
    q = torch.randn(len(LENGTHS), 2 * gq, 64, generator=g)
    want = TorchBackend().decode(q, kv, 0, meta, 0.125)
    for backend in (TritonBackend(), SPLITTING):
        torch.testing.assert_close(backend.decode(q, kv, 0, meta, 0.125), want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_mixed_levels_in_one_layer(dtype):
    """Four KV heads at four levels: four runs in one layer (the second), head_dim 128, 7 query
    heads per group, in every model dtype; the tolerance is far below what other K/V gives."""
    kv, meta, g = build_step(levels(*LEVELS), LENGTHS, 16, 128, dtype, is_prefill=False, layers=2)
    q = torch.randn(len(LENGTHS), 4 * 7, 128, generator=g).to(dtype)
    want = TorchBackend().decode(q, kv, 1, meta, 128**-0.5)
    for backend in (TritonBackend(), SPLITTING):
        got = backend.decode(q, kv, 1, meta, 128**-0.5)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])
    meta.max_seq_len = 16  # an under-estimate only sizes the splits: the last one reads the rest
    torch.testing.assert_close(
        SPLITTING.decode(q, kv, 1, meta, 128**-0.5).float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype]
    )
    wrong = TorchBackend().decode(q, kv, 0, meta, 128**-0.5)  # layer 0's blocks: the same levels, other K/V
    assert (wrong.float() - want.float()).abs().max() > 0.1


@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("level", LEVELS)
def test_store_decode_matches_reference(level, block_size):
    """The new tokens land in their slots (int8: the same codes and scales), and window groups
    fold the token leaving the ring into the compensation slot first."""
    want, meta, g = build_step(levels(level, level), LENGTHS, block_size, 64, torch.float32, is_prefill=False)
    got, before = copy.deepcopy(want), copy.deepcopy(want)
    k, v = torch.randn(2, len(LENGTHS), 2, 64, generator=g)
    TorchBackend().store(want, 0, k, v, meta)
    TritonBackend().store(got, 0, k, v, meta)
    assert_pools_equal(got, want)
    lv = make_level(level, SINK, RECENT)
    if lv.comp_slot is not None:  # the sequences that evict changed their compensation slots
        rows = torch.tensor([1, 2, 3])
        comp = got.flat_slots(meta.block_tables[:2], rows, torch.full_like(rows, lv.comp_slot)).flatten()
        pool, old = got.pools[want.layout.runs(0)[0].pool], before.pools[want.layout.runs(0)[0].pool]
        assert (pool.k.view(-1, 64)[comp] != old.k.view(-1, 64)[comp]).any(-1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_prefill_matches_reference(dtype):
    """Whole prompts at every level in one layer: dropped tokens (slot -1) skipped, window groups'
    compensation slots hold the mean of the evicted middle."""
    lengths = [5, 29, 41]
    want, meta, g = build_step(levels(*LEVELS), lengths, 16, 64, dtype, is_prefill=True)
    got = copy.deepcopy(want)
    k, v = torch.randn(2, sum(lengths), 4, 64, generator=g).to(dtype)
    TorchBackend().store(want, 0, k, v, meta)
    TritonBackend().store(got, 0, k, v, meta)
    # bf16: Triton's interpreter truncates fp32 -> bf16 where torch rounds (the compensation means)
    assert_pools_equal(got, want, exact=dtype == torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 80])
def test_rope_fused_with_the_decode_cache_write(dtype, head_dim):
    """Decode on the GPU path rotates q and k inside the cache write: the same rotated queries and the
    same pools as RoPE followed by the reference store, with every level in one layer (each run's
    launch rotates the query heads of its own groups), 7 query heads per group, q/k/v as strided
    views of one projection output, and a head_dim whose half is not a power of two. Bit for bit:
    the kernel rounds where torch does (fp16 here; the interpreter truncates to bf16)."""
    from atb_llm.layers.rotary import RotaryEmbedding

    want, meta, g = build_step(levels(*LEVELS), LENGTHS, 16, head_dim, dtype, is_prefill=False)
    got = copy.deepcopy(want)
    qkv = torch.randn(len(LENGTHS), 4 * 7 + 2 * 4, head_dim, generator=g).to(dtype)
    q, k, v = qkv.split([28, 4, 4], dim=1)
    rope = RotaryEmbedding(head_dim, 256, 10000.0).table(meta.input_lengths - 1, dtype)
    q_want = TorchBackend().decode_store(q, k, v, rope, want, 0, meta)
    q_got = TritonBackend().decode_store(q, k, v, rope, got, 0, meta)
    assert (q_want - q).abs().max() > 0.1  # the positions (4 .. 149) do rotate
    assert torch.equal(q_got, q_want)
    assert_pools_equal(got, want)


def test_block_size_not_a_power_of_two():
    """block_size 48 (a multiple of 16): decode tiles of 16 slots, never straddling two blocks."""
    kv, meta, g = build_step(levels(*LEVELS), LENGTHS, 48, 64, torch.float32, is_prefill=False)
    q = torch.randn(len(LENGTHS), 4 * 3, 64, generator=g)
    want = TorchBackend().decode(q, kv, 0, meta, 0.125)
    for backend in (TritonBackend(), SPLITTING):
        torch.testing.assert_close(backend.decode(q, kv, 0, meta, 0.125), want, rtol=1e-5, atol=2e-5)
    got = copy.deepcopy(kv)
    k, v = torch.randn(2, len(LENGTHS), 4, 64, generator=g)
    TorchBackend().store(kv, 0, k, v, meta)
    TritonBackend().store(got, 0, k, v, meta)
    assert_pools_equal(got, kv)


def test_get_backend_by_device_and_by_name():
    assert isinstance(get_backend("cpu"), TorchBackend)
    assert isinstance(get_backend("cpu", "triton"), TritonBackend)
    with pytest.raises(ValueError, match="attention backend 'cudnn' is unknown"):
        get_backend("cpu", "cudnn")


def test_kernels_compile_for_sm90():
    """The interpreter runs kernels without compiling them: they must also build to a cubin for an
    H100 (in a subprocess, TRITON_INTERPRET off; Triton's wheel carries the compiler and ptxas)."""
    pytest.importorskip("triton.backends.nvidia", reason="this triton has no NVIDIA backend")
    root = Path(__file__).parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default; set to silence Triton's notice
    script = Path(__file__).with_name("triton_sm90.py")
    r = subprocess.run([sys.executable, str(script)], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "compiled 15 kernels for sm_90" in r.stdout


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.slow
def test_engine_end_to_end_matches_torch(tiny_models, chunked):
    """The tiny model with every level (window sink 4, recent 8: prompts evict) gives the same
    greedy tokens and log-probabilities through the Triton kernels as through the reference, with
    whole prompts and with prompts in chunks of 16 tokens."""
    path = str(tiny_models())
    names = ["full", "window", "window_int8", "full_int8"]  # layer 0, then layer 1 (2 KV heads each)
    layout = GroupLayout(2, 2, tuple(make_level(n, 4, 8) for n in names))
    prompts = [list(range(3, 40)), list(range(100, 110)), [7] * 3]
    params = SamplingParams(max_tokens=6, ignore_eos=True, logprob_token_ids=(1, 50, 200))
    outs = {}
    for backend in ("torch", "triton"):
        cfg = EngineConfig(
            path, dtype="fp32", block_size=16, max_output_length=8, attention_backend=backend, progress=False,
            chunked_prefill=chunked, max_prefill_tokens=16,
        )  # fmt: skip
        outs[backend] = LLMEngine(cfg, layout=layout).generate(prompts, params)
    for ref, got in zip(outs["torch"], outs["triton"]):
        assert got.token_ids == ref.token_ids and len(got.token_ids) == 6
        for a, b in zip(got.logprobs, ref.logprobs):
            assert a.keys() == b.keys()
            assert all(abs(a[t] - b[t]) < 1e-4 for t in a)
