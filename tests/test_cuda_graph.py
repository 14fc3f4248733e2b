"""Decode through the CUDA-graph runner's static buffers. Without CUDA the runner runs the forward
eagerly on its buffers, which checks what graphs add: the copies into static buffers, padding a
batch up to its bucket (rows that must neither write the cache nor fold a window), and buffers
left over from a larger batch. The graph capture itself needs a GPU."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from atb_llm.compression.layout import GroupLayout
from atb_llm.compression.levels import make_level
from atb_llm.layers.attention.torch_backend import TorchBackend
from atb_llm.layers.attention.triton_backend import TritonBackend
from atb_llm.models.base.forward_batch import ForwardBatch
from atb_llm.runtime.cuda_graph import DecodeGraphs, buckets, buffer_blocks, use_graphs
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams


def test_buckets():
    assert buckets(1) == [1]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(20) == [1, 2, 4, 8, 16, 20]
    assert buckets(32) == [1, 2, 4, 8, 16, 24, 32]


def test_graphs_only_on_cuda_with_triton_and_buffers_hold_the_longest_sequence():
    triton, torch_ = TritonBackend.cuda_graphs, TorchBackend.cuda_graphs
    assert use_graphs("cuda", triton, False) and use_graphs("cuda:1", triton, False)
    assert not use_graphs("cuda", triton, True)  # --enforce_eager
    assert not use_graphs("cpu", triton, False) and not use_graphs("cuda", torch_, False)
    for n in (1, 15, 16, 17, 100, 4096):
        blocks = buffer_blocks(n, 16)
        assert isinstance(blocks, int) and n <= (blocks - 1) * 16 < n + 16


def run(path, backend, graphs):
    names = ["full", "window", "window_int8", "full_int8"]  # windows of sink 4 + recent 8: decode folds
    layout = GroupLayout(2, 2, tuple(make_level(n, 4, 8) for n in names))
    cfg = EngineConfig(path, dtype="fp32", block_size=16, max_batch_size=8, max_input_length=40, max_output_length=12,
                       attention_backend=backend, progress=False)  # fmt: skip
    eng = LLMEngine(cfg, layout=layout)
    assert eng.runner.graphs is None  # no CUDA: the engine builds none
    if graphs:
        eng.runner.graphs = DecodeGraphs(eng.model, eng.cache_manager.kv_cache, 8, 4, eng.max_seq_len, "cpu")
    prompts = [list(range(3, 40)), list(range(100, 110)), [7] * 3, list(range(50, 70)), [9, 8]]
    params = [SamplingParams(max_tokens=m, ignore_eos=True, logprobs=1) for m in (12, 3, 7, 5, 9)]
    outs = eng.generate(prompts, params)
    return eng, [o.token_ids for o in outs], [[t.logprob for t in o.output_logprobs] for o in outs]


@pytest.mark.slow
def test_decode_through_the_buffers_equals_eager_decode(tiny_models):
    """5 sequences (bucket 8: three padding rows), then 4, 3, 2, 1 as they finish (buckets 4, 4, 2, 1):
    the same tokens and log-probs as plain decode, so padding rows wrote nothing and stale rows
    of larger batches were not read."""
    path = str(tiny_models())  # the triton backend: the one the engine captures graphs with
    _, want_tokens, want_lp = run(path, "triton", graphs=False)
    eng, tokens, lp = run(path, "triton", graphs=True)
    assert tokens == want_tokens and [len(t) for t in tokens] == [12, 3, 7, 5, 9]
    for a, b in zip(lp, want_lp):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    assert sorted(eng.runner.graphs.graphs) == [1, 2, 4, 8]  # every bucket the batch passed through


def test_a_step_wider_than_the_buffers_runs_eagerly(tiny_models):
    cfg = EngineConfig(str(tiny_models()), dtype="fp32", block_size=16, max_input_length=40, progress=False,
                       attention_backend="triton")  # fmt: skip
    eng = LLMEngine(cfg)
    graphs = eng.runner.graphs = DecodeGraphs(eng.model, eng.cache_manager.kv_cache, 2, 1, eng.max_seq_len, "cpu")
    buffers = (graphs.input_ids, graphs.positions, graphs.input_lengths, graphs.slots, graphs.block_tables)
    assert all(t.dtype == torch.int64 for t in buffers)  # what eager decode passes: copies keep the dtype
    out = eng.generate([list(range(3, 40)), [5, 6], [7]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [3, 3, 3]
    assert graphs.graphs == {}  # 3 sequences, then 37+ tokens in 3 blocks: never within 2 x 1 block
    tables = torch.zeros(4, 3, 1, dtype=torch.int64)
    assert not graphs.fits(tables) and graphs.fits(tables[:, :2])
    with pytest.raises(ValueError, match="a decode step of 3 sequences x 1 blocks exceeds the graphs' buffers"):
        kv, ones = eng.cache_manager.kv_cache, torch.ones(3, dtype=torch.int64)
        graphs.run(ForwardBatch(ones, ones, False, kv, tables, torch.zeros(4, 3, dtype=torch.int64), ones, 3))


# ---- no host synchronisation --------------------------------------------------------------------
class HostSyncs(TorchDispatchMode):
    """Records the operations that make the host wait for the device: reading a value back
    (.item(), int(), bool() of a tensor), and those whose result size depends on the data
    (nonzero, boolean-mask indexing, masked_select, repeats given as a tensor). A CUDA graph
    cannot capture them. Device-to-host copies (.cpu(), .tolist()) are invisible on a CPU."""

    NAMES = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "repeat_interleave.Tensor")

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        indices = args[1] if name.startswith("aten.index.") else ()
        if any(n in name for n in self.NAMES) or any(getattr(i, "dtype", None) == torch.bool for i in indices):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_the_detector_sees_host_syncs():
    x = torch.arange(4.0)
    with HostSyncs() as m:
        int(x[1]), x[x > 1], x.nonzero(), x.repeat_interleave(torch.tensor([1, 2, 1, 1]))
        x[torch.tensor([0, 2])], x.argmax(-1)  # index by position, a reduction: no sync
    assert m.seen == ["aten._local_scalar_dense.default", "aten.index.Tensor", "aten.nonzero.default",
                      "aten.repeat_interleave.Tensor"]  # fmt: skip


@pytest.mark.slow
def test_decode_forward_and_sampling_wait_for_no_device_value(tiny_models):
    """What a graph captures, the decode forward on the triton backend (every level, int8 levels with
    their measured smoothing scales, batch sizes 2 then 1), reads no value back from the device;
    sampling (greedy, seeded, top-k, top-p rows in one batch) brings the tokens back in one copy
    (.tolist(), not seen here) and waits for nothing else."""
    names = ["full", "window", "window_int8", "full_int8"]
    layout = GroupLayout(2, 2, tuple(make_level(n, 4, 8) for n in names))
    cfg = EngineConfig(str(tiny_models()), dtype="fp32", block_size=16, max_input_length=40, max_output_length=8,
                       attention_backend="triton", progress=False)  # fmt: skip
    eng = LLMEngine(cfg, layout=layout)
    model, sampler, decode_syncs, sample_syncs = eng.runner.model, eng.runner.sampler, [], []

    def watched_model(batch):
        if batch.is_prefill:  # not captured
            return model(batch)
        with HostSyncs() as m:
            out = model(batch)
        decode_syncs.append(m.seen)
        return out

    def watched_sampler(logits, seqs):
        with HostSyncs() as m:
            out = sampler(logits, seqs)
        sample_syncs.append(m.seen)
        return out

    watched_sampler.logprobs = sampler.logprobs
    eng.runner.model, eng.runner.sampler = watched_model, watched_sampler
    params = [
        SamplingParams(max_tokens=6, ignore_eos=True),
        SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.8, seed=3, top_k=5, top_p=0.9),
    ]
    outs = eng.generate([list(range(3, 30)), [5, 6]], params)
    assert [len(o.token_ids) for o in outs] == [6, 4]
    assert len(decode_syncs) == 5 and decode_syncs == [[]] * 5  # 3 steps of two sequences, 2 of one
    assert len(sample_syncs) == 6 and sample_syncs == [[]] * 6
