"""Chunked prefill: a prompt computed over several steps of at most `max_prefill_tokens` tokens.

With compression off it is exact: the same greedy tokens as transformers and the same logits as
one-piece prefill (fp32). With window levels a chunk sees what each group keeps of the earlier
chunks (sinks, ring, compensation slot), not the whole prompt: checked against a direct
computation, and the cache it leaves behind equals the one a one-piece prefill writes.
"""

import math
import random

import pytest
import torch
from levels import level_table
from tiny import hf_greedy

from atb_llm.cache.cache_manager import CacheConfig, CacheManager
from atb_llm.compression.layout import GroupLayout
from atb_llm.compression.levels import Level, Window
from atb_llm.layers.attention.metadata import AttentionMetadata
from atb_llm.layers.attention.torch_backend import TorchBackend
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams, Sequence

BS = 16


def engine(path, chunked: bool, budget: int = 16, layout=None, **kw) -> LLMEngine:
    cfg = EngineConfig(
        str(path), block_size=BS, max_input_length=128, max_output_length=24, max_prefill_tokens=budget,
        chunked_prefill=chunked, progress=False, **kw,
    )  # fmt: skip
    return LLMEngine(cfg, layout=layout)


def random_prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(2, 320) for _ in range(n)] for n in lengths]


# ---- engine: exact with compression off --------------------------------------------------------
def test_chunked_greedy_equals_transformers(tiny_models):
    path = tiny_models()
    prompts = random_prompts([1, 15, 16, 17, 40, 75, 100])
    got = engine(path, chunked=True, max_batch_size=7).generate(prompts, SamplingParams(max_tokens=12))
    assert [o.token_ids for o in got] == hf_greedy(path, prompts, 12)


def forced_logits(eng: LLMEngine, prompt, forced) -> torch.Tensor:
    params = SamplingParams(force_tokens=forced, logprob_token_ids=tuple(range(320)), prompt_logprobs=3)
    (out,) = eng.generate([prompt], params)
    rows = torch.tensor([[d[t] for t in range(320)] for d in out.logprobs])
    return rows, out.prompt_logprobs


@pytest.mark.parametrize("budget", [16, 23, 64])
def test_chunked_logits_and_prompt_logprobs_equal_one_piece(tiny_models, budget):
    path = tiny_models()
    (prompt,) = random_prompts([90], seed=1)
    forced = tuple(random_prompts([6], seed=2)[0])
    want, want_prompt = forced_logits(engine(path, chunked=False, budget=4096), prompt, forced)
    got, got_prompt = forced_logits(engine(path, chunked=True, budget=budget), prompt, forced)
    assert (got - want).abs().max().item() < 1e-5
    assert len(got_prompt) == len(prompt) and got_prompt[0] is None
    for a, b in zip(got_prompt[1:], want_prompt[1:]):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-5
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


# ---- scheduling --------------------------------------------------------------------------------
def test_a_long_prompt_is_chunked_between_decode_steps(tiny_models):
    eng = engine(tiny_models(), chunked=True, max_batch_size=2)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    first = eng.add_request(random_prompts([5])[0], params)
    assert eng.step() == [first] and eng.step() == [first]  # prefill, decode
    long = eng.add_request(random_prompts([70], seed=3)[0], params)
    got = [eng.step() for _ in range(9)]
    # chunks of 16, 16, 16, 16, 6 tokens; the short request decodes between them
    assert got == [[], [first], [], [first], [], [first], [], [first], [long]]
    assert long.num_computed_tokens == 70 and len(first.output_token_ids) == 6
    assert eng.step() == [first, long]  # then both decode together


def test_without_chunking_a_long_prompt_takes_one_step(tiny_models):
    eng = engine(tiny_models(), chunked=False, max_batch_size=2)
    long = eng.add_request(random_prompts([70], seed=3)[0], SamplingParams(max_tokens=4))
    assert eng.step() == [long] and long.num_computed_tokens == 70


# ---- window levels: the chunk's attention and the cache it leaves ------------------------------
def chunk_reference(q, keys, values, c, sink, recent, scale):
    """Each row i of q (position c + i) over what a window keeps at length c plus chunk keys up to
    c + i. keys, values: [n, Hkv, D] every token; q: [L, Hq, D] -> [L, Hq, D]."""
    out, rep = [], q.shape[1] // keys.shape[1]
    kept = list(range(min(sink, c))) + list(range(max(sink, c - recent), c))
    evicted = list(range(sink, max(sink, c - recent)))
    for i in range(q.shape[0]):
        idx = kept + list(range(c, c + i + 1))
        k, v = keys[idx], values[idx]
        bias = torch.zeros(len(idx))
        if evicted:
            k = torch.cat([k, keys[evicted].mean(0, keepdim=True)])
            v = torch.cat([v, values[evicted].mean(0, keepdim=True)])
            bias = torch.cat([bias, torch.tensor([math.log(len(evicted))])])
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        logits = torch.einsum("hd,mhd->hm", q[i], k) * scale + bias
        out.append(torch.einsum("hm,mhd->hd", logits.softmax(-1), v))
    return torch.stack(out)


def run_chunks(level: Level, keys, values, queries, chunks):
    """Stores and attends one sequence chunk by chunk, as the engine does; returns the attention
    output per chunk and the cache manager."""
    hkv, d = keys.shape[1], keys.shape[2]
    layout = GroupLayout.uniform(1, hkv, level)
    cm = CacheManager(layout, CacheConfig(block_size=BS), d, torch.float32, max_batch_size=1, max_seq_len=128)
    n = keys.shape[0]
    seq = Sequence(list(range(n)), SamplingParams())
    cm.block_manager.allocate(seq.block_table, n)
    backend, outs, c = TorchBackend(), [], 0
    for m in chunks:
        lengths = torch.tensor([c + m])
        tables = cm.block_tables([seq.block_table])
        slots = cm.slots(tables, torch.zeros(m, dtype=torch.int64), torch.arange(c, c + m), lengths)
        meta = AttentionMetadata.build(True, tables, slots, lengths, c + m, BS, torch.float32, torch.tensor([m]))
        k, v, q = keys[c : c + m], values[c : c + m], queries[c : c + m]
        outs.append(backend.prefill(q, k, v, cm.kv_cache, 0, meta, d**-0.5))
        backend.store(cm.kv_cache, 0, k, v, meta)
        c += m
    return outs, cm, seq


def kept_cache(cm: CacheManager, seq: Sequence, level: Level) -> torch.Tensor:
    """[slots read, Hkv, 2, D] K and V of the slots decode would read now."""
    read = int(level.read_len(torch.tensor([seq.num_tokens])))
    tables = cm.block_tables([seq.block_table])[:, 0, :]
    k, v = cm.kv_cache.pools[level.pool].gather(tables, torch.float32)
    return torch.stack([k[:, :read], v[:, :read]], 2).transpose(0, 1)


LEVELS = [*level_table(3, 20), Window(sink=0, recent=9)]  # and a window without sinks


@pytest.mark.parametrize("level", LEVELS, ids=lambda lv: lv.describe())
@pytest.mark.parametrize("chunks", [[70], [16, 16, 16, 16, 6], [5, 40, 1, 24], [31, 39]])
def test_chunks_attend_to_what_each_level_keeps_and_leave_the_one_piece_cache(level, chunks):
    torch.manual_seed(0)
    n, hq, hkv, d = 70, 4, 2, 8
    keys, values, queries = torch.randn(n, hkv, d), torch.randn(n, hkv, d), torch.randn(n, hq, d)
    outs, cm, seq = run_chunks(level, keys, values, queries, chunks)
    _, whole, _ = run_chunks(level, keys, values, queries, [n])
    tol = 3e-2 if level.int8 else 1e-5
    assert (kept_cache(cm, seq, level) - kept_cache(whole, seq, level)).abs().max().item() < tol
    sink, recent = (level.sink, level.recent) if isinstance(level, Window) else (n, n)
    c = 0
    for m, got in zip(chunks, outs):
        want = chunk_reference(queries[c : c + m], keys, values, c, sink, recent, d**-0.5)
        assert (got - want).abs().max().item() < tol, f"chunk at {c}"
        c += m


def test_windows_change_chunked_attention_only_where_earlier_chunks_were_evicted():
    """The first chunk sees its whole self; a later chunk past sink + recent does not see the
    middle of earlier chunks, so it differs from one-piece prefill there (and only there)."""
    torch.manual_seed(1)
    n, hq, hkv, d = 70, 4, 2, 8
    keys, values, queries = torch.randn(n, hkv, d), torch.randn(n, hkv, d), torch.randn(n, hq, d)
    full, _, _ = run_chunks(Level(), keys, values, queries, [n])
    outs, _, _ = run_chunks(Window(sink=3, recent=20), keys, values, queries, [40, 30])
    assert (outs[0] - full[0][:40]).abs().max().item() < 1e-5  # 17 of its tokens fall out only after
    assert (outs[1] - full[0][40:]).abs().max().item() > 1e-2


# ---- engine: MLGC plans with chunks ------------------------------------------------------------
def test_a_covering_window_chunked_equals_one_piece(tiny_models):
    """sink + recent covers the sequence: nothing is evicted, so chunking changes nothing."""
    path = tiny_models()
    layout = GroupLayout.uniform(2, 2, Window(sink=4, recent=120))
    (prompt,) = random_prompts([90], seed=4)
    forced = tuple(random_prompts([6], seed=5)[0])
    want, _ = forced_logits(engine(path, chunked=False, budget=4096, layout=layout), prompt, forced)
    got, _ = forced_logits(engine(path, chunked=True, budget=16, layout=layout), prompt, forced)
    assert (got - want).abs().max().item() < 1e-5


def test_chunked_prefill_holds_only_the_compressed_blocks(tiny_models):
    path = tiny_models()
    layout = GroupLayout(2, 2, (Level(), Window(sink=4, recent=12), Window(sink=4, recent=12), Level()))
    eng = engine(path, chunked=True, budget=16, layout=layout)
    seq = eng.add_request(random_prompts([100], seed=6)[0], SamplingParams(max_tokens=2, ignore_eos=True))
    eng.step()  # first chunk
    used = eng.cache_manager.block_manager.num_used()["model"]
    # full groups: ceil(100 / 16) = 7 blocks each; window groups: ceil(17 / 16) = 2 blocks each
    assert used == 2 * 7 + 2 * 2 == eng.cache_manager.blocks_for(100)["model"]
    while eng.has_unfinished():
        eng.step()
    assert len(seq.output_token_ids) == 2 and eng.cache_manager.block_manager.num_used()["model"] == 0
