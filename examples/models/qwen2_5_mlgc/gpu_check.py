"""The Triton backend on a CUDA GPU at Qwen2.5-7B shapes: equality with the torch reference, then
decode-attention time per MLGC level.

    python examples/models/qwen2_5_mlgc/gpu_check.py [--batch 1 8] [--contexts 8192 32768] [--block_size 128]

Check (bf16; 28 layers x 4 KV heads, head_dim 128, 28 query heads; every group at a random level,
windows of sink 64 + recent 1024): one decode step's cache write and the attention of every layer
equal TorchBackend's. Timing: one layer's decode attention, its 4 groups at one level, as a
Markdown table with the K/V bytes the step must read (int8 scales included) and the GB/s achieved.
"""

from __future__ import annotations

import argparse
import copy
import random

import torch
from triton.testing import do_bench

from atb_llm.cache.cache_manager import CacheConfig, CacheManager
from atb_llm.compression.layout import GroupLayout
from atb_llm.compression.levels import make_level
from atb_llm.layers.attention.metadata import AttentionMetadata
from atb_llm.layers.attention.torch_backend import TorchBackend
from atb_llm.layers.attention.triton_backend import TritonBackend
from atb_llm.runtime.model_runner import ModelRunner
from atb_llm.runtime.sequence import SamplingParams, Sequence

LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM = 28, 4, 28, 128
LEVELS = ("full", "window", "full_int8", "window_int8")
SCALE = HEAD_DIM**-0.5


def decode_step(levels, lengths, block_size, dtype=torch.bfloat16):
    """A cache of random K/V on the GPU holding `lengths` tokens per sequence (this step's token
    included), laid out by the cache manager, and the decode step's metadata."""
    layout = GroupLayout(len(levels) // KV_HEADS, KV_HEADS, tuple(levels))
    cm = CacheManager(layout, CacheConfig(block_size), HEAD_DIM, dtype, len(lengths), max(lengths), "cuda")
    seqs = []
    for n in lengths:
        seqs.append(Sequence(list(range(n - 1)), SamplingParams()))
        seqs[-1].output_token_ids.append(0)
        cm.block_manager.allocate(seqs[-1].block_table, seqs[-1].num_tokens)
    a = ModelRunner(None, cm).prepare(seqs, is_prefill=False)
    meta = AttentionMetadata.build(False, a.block_tables, a.slots, a.input_lengths, a.max_seq_len, block_size, dtype)
    for pool in cm.kv_cache.pools.values():
        if pool.is_int8:
            for codes in (pool.k, pool.v):
                codes.random_(-127, 128)
            for scale in (pool.k_scale, pool.v_scale):
                scale.uniform_(0.005, 0.025)
        else:
            for x in (pool.k, pool.v):
                x.normal_()
    return cm.kv_cache, meta


def check(block_size: int) -> None:
    rng = random.Random(0)
    levels = [make_level(rng.choice(LEVELS)) for _ in range(LAYERS * KV_HEADS)]
    lengths = [1, 100, 1089, 1090, 5000, 9000]  # 1089: the first token leaves a window
    got, meta = decode_step(levels, lengths, block_size)
    want = copy.deepcopy(got)
    q = torch.randn(len(lengths), Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, len(lengths), KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    triton_be, torch_be, worst = TritonBackend(), TorchBackend(), 0.0
    for layer in range(LAYERS):
        torch_be.store(want, layer, k, v, meta)
        triton_be.store(got, layer, k, v, meta)
        ref = torch_be.decode(q, want, layer, meta, SCALE)
        out = triton_be.decode(q, want, layer, meta, SCALE)  # the same cache: attention alone
        worst = max(worst, (out.float() - ref.float()).abs().max().item())
    print(f"block_size {block_size}: decode max |triton - torch| = {worst:.3g}")
    assert worst < 5e-2, f"decode differs from the torch reference by {worst}"
    for name, p in want.pools.items():  # bf16 K/V: an ulp; int8: a code; scales: fp32 rounding
        for part in ("k", "v", "k_scale", "v_scale") if p.is_int8 else ("k", "v"):
            err = (getattr(got.pools[name], part).float() - getattr(p, part).float()).abs().max().item()
            limit = 1e-6 if "scale" in part else 1.0 if p.is_int8 else 0.05
            print(f"  store, pool {name}, {part}: max diff {err:.3g} (limit {limit})")
            assert err <= limit, f"store differs from the torch reference in pool {name} {part} by {err}"


def bench(contexts: list[int], batches: list[int], block_size: int) -> None:
    print("\n| level | context | batch | KV read per step, one layer (MB) | decode attention (us) | GB/s |")
    print("|---|---|---|---|---|---|")
    backend = TritonBackend()
    for ctx in contexts:
        for b in batches:
            for name in LEVELS:
                level = make_level(name)
                kv, meta = decode_step([level] * KV_HEADS, [ctx] * b, block_size)
                q = torch.randn(b, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                ms = do_bench(lambda kv=kv, meta=meta, q=q: backend.decode(q, kv, 0, meta, SCALE))
                slots = int(level.read_len(torch.tensor([ctx]))) * b * KV_HEADS
                nbytes = slots * 2 * (HEAD_DIM * (1 if level.int8 else 2) + (4 if level.int8 else 0))
                print(f"| {name} | {ctx} | {b} | {nbytes / 1e6:.1f} | {ms * 1e3:.1f} | {nbytes / ms / 1e6:.0f} |")
                del kv, meta
                torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--block_size", "--block-size", type=int, default=128)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU: torch.cuda.is_available() is False")
    print(torch.cuda.get_device_name())
    for bs in sorted({16, args.block_size}):
        check(bs)
    bench(args.contexts, args.batch, args.block_size)


if __name__ == "__main__":
    main()
