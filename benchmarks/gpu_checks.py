"""bench_gpu's setup and kernel checks: every GPU kernel (paged decode per level, the fused cache
write, the weight-only GEMMs, the int8 and int4 + sparse GEMMs) against the torch reference, on the run's shapes."""

from __future__ import annotations

import copy
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from atb_llm.cache.cache_manager import CacheConfig, CacheManager
from atb_llm.compression.layout import GroupLayout
from atb_llm.compression.levels import make_level
from atb_llm.config import ModelConfig
from atb_llm.layers.attention.metadata import AttentionMetadata
from atb_llm.layers.attention.torch_backend import TorchBackend
from atb_llm.layers.attention.triton_backend import TritonBackend
from atb_llm.layers.rotary import RotaryEmbedding
from atb_llm.quantization.dense_sparse import DenseSparse
from atb_llm.quantization.w4a16 import pack_int4, quantize_w4_groups
from atb_llm.quantization.w8a8 import IntMM
from atb_llm.runtime.model_runner import ModelRunner
from atb_llm.runtime.sequence import SamplingParams, Sequence
from benchmarks.common import CONFIGS

LEVELS = ("full", "window", "full_int8", "window_int8")
CONFIG_7B = CONFIGS / "qwen2.5-7b-instruct.json"


@dataclass(frozen=True)
class Setup:
    """Shapes and lengths of one run: the real ones on CUDA, small ones under the interpreter."""

    device: str
    dtype: torch.dtype
    config: dict
    short: int  # prompt tokens before the decode rows (256)
    first: int  # prompt tokens of the first-token row (2048)
    long: int  # context of the long decode rows (32768)
    long_batch: int  # 16
    steps: int  # decode steps timed per row
    sink: int
    recent: int
    block_size: int


def tiny_config() -> dict:
    """Qwen2 with the default tokenizer's vocabulary, 2 layers of 128 hidden units (one W4A16 group
    of 128), GQA 4/2."""
    return dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6, hidden_act="silu",
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645, torch_dtype="float32",
    )  # fmt: skip


def make_setup(config_path: Path | None, device: str | None) -> Setup:
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if cuda:
        config = json.loads((config_path or CONFIG_7B).read_text())
        return Setup("cuda", torch.bfloat16, config, 256, 2048, 32768, 16, 64, 64, 1024, 128)
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit(
            "no CUDA device here: run the kernels on the CPU under Triton's interpreter with "
            "TRITON_INTERPRET=1 python -m benchmarks.bench_gpu"
        )
    config = json.loads(config_path.read_text()) if config_path else tiny_config()
    return Setup("cpu", torch.float32, config, 16, 64, 96, 4, 3, 4, 32, 16)


# ---- checks ----------------------------------------------------------------------------------


def decode_step(s: Setup, c: ModelConfig, levels, lengths: list[int]):
    """A cache of random K/V holding `lengths` tokens per sequence (this step's token included),
    laid out by the cache manager, and the decode step's metadata."""
    layout = GroupLayout(c.num_hidden_layers, c.num_key_value_heads, tuple(levels))
    cm = CacheManager(layout, CacheConfig(s.block_size), c.head_dim, s.dtype, len(lengths), max(lengths), s.device)
    seqs = []
    for n in lengths:
        seqs.append(Sequence(list(range(n - 1)), SamplingParams()))
        seqs[-1].output_token_ids.append(0)
        cm.block_manager.allocate(seqs[-1].block_table, seqs[-1].num_tokens)
    a = ModelRunner(None, cm).prepare(seqs, is_prefill=False).forward
    meta = AttentionMetadata.build(
        False, a.block_tables, a.slots, a.input_lengths, a.max_seq_len, s.block_size, s.dtype
    )
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


def check_attention(s: Setup, c: ModelConfig) -> list[str]:
    """Every group at a random level; lengths around the window's edge and beyond it."""
    rng = random.Random(0)
    levels = [make_level(rng.choice(LEVELS), s.sink, s.recent) for _ in range(c.num_groups)]
    edge = s.sink + s.recent + 1  # the first token that leaves a window
    lengths = [1, s.sink + 3, edge, edge + 1, 3 * edge, 6 * edge]
    got, meta = decode_step(s, c, levels, lengths)
    want = copy.deepcopy(got)
    q = torch.randn(len(lengths), c.num_attention_heads, c.head_dim, device=s.device, dtype=s.dtype)
    k, v = torch.randn(2, len(lengths), c.num_key_value_heads, c.head_dim, device=s.device, dtype=s.dtype)
    rotary = RotaryEmbedding(c.head_dim, max(lengths), c.rope_theta).to(s.device)
    rope = rotary.table(meta.input_lengths - 1, s.dtype)
    scale, worst, worst_q = c.head_dim**-0.5, 0.0, 0.0
    triton_be, torch_be = TritonBackend(), TorchBackend()
    for layer in range(c.num_hidden_layers):  # RoPE + cache write, then attention over the same cache
        q_ref = torch_be.decode_store(q, k, v, rope, want, layer, meta)
        q_rot = triton_be.decode_store(q, k, v, rope, got, layer, meta)
        worst_q = max(worst_q, (q_rot.float() - q_ref.float()).abs().max().item())
        ref = torch_be.decode(q_ref, want, layer, meta, scale)
        out = triton_be.decode(q_ref, want, layer, meta, scale)
        worst = max(worst, (out.float() - ref.float()).abs().max().item())
    limit, limit_q = (5e-2, 2e-2) if s.dtype != torch.float32 else (1e-4, 1e-5)
    lines = [
        f"decode RoPE of q (fused with the cache write): max |triton - torch| {worst_q:.2g} (<= {limit_q})",
        f"decode attention, lengths {lengths}, block {s.block_size}: max |triton - torch| {worst:.2g} (<= {limit})",
    ]
    assert worst_q <= limit_q, lines[0]
    assert worst <= limit, lines[1]
    for name, p in want.pools.items():  # 16-bit K/V: an ulp; int8: a code; scales: fp32 rounding
        for part in ("k", "v", "k_scale", "v_scale") if p.is_int8 else ("k", "v"):
            err = (getattr(got.pools[name], part).float() - getattr(p, part).float()).abs().max().item()
            limit = 1e-6 if "scale" in part else 1.0 if p.is_int8 else 0.05
            lines.append(f"cache write, pool {name}, {part}: max diff {err:.2g} (<= {limit})")
            assert err <= limit, lines[-1]
    return lines


def sparse_like(n: int, k: int, gen: torch.Generator, outliers: float = 0.015) -> torch.Tensor:
    """int8 weights as msModelSlim's sparse practice writes them: 4-bit values, 20% pruned, a share
    `outliers` anywhere in -128..127."""
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    q[torch.rand(n, k, generator=gen) < 0.2] = 0
    spots = torch.rand(n, k, generator=gen) < outliers
    q[spots] = torch.randint(-128, 128, (int(spots.sum()),), generator=gen, dtype=torch.int8)
    return q


def check_gemm(s: Setup) -> list[str]:
    """The weight-only GEMM at the model's MLP shape and the int8 GEMM, decode and prefill rows."""
    from atb_llm.quantization.triton_gemm import wq_matmul

    k, n = s.config["hidden_size"], s.config["intermediate_size"]
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * 0.02
    lines = []
    for m in (1, 16, 64):
        x = torch.randn(m, k, generator=gen).to(s.device, s.dtype)
        for kind, group in (("int8", k), ("int4", 128)):
            if kind == "int8":
                scale = w.abs().amax(1, keepdim=True) / 127
                q, zero = torch.round(w / scale).to(torch.int8), torch.zeros_like(scale)
                args = (q, scale, zero)
            else:
                q, scale, offset = quantize_w4_groups(w, group)
                zero = -offset * scale
                args = (pack_int4(q), scale, zero)
            wq = (q.float().view(n, k // group, group) * scale[..., None] + zero[..., None]).view(n, k)
            want = x.float().cpu() @ wq.T
            got = wq_matmul(x, *(a.to(s.device) for a in args), group=group, int4=kind == "int4").float().cpu()
            err = ((got - want).abs().max() / want.abs().max()).item()
            limit = 1e-5 if s.dtype == torch.float32 else 1e-2
            lines.append(f"W{kind[3:]}A16 GEMM {m}x{k} @ {n}x{k}: max relative error {err:.2g} (<= {limit})")
            assert err <= limit, lines[-1]
        xq = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int16)
        q8 = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        exact = torch.equal(IntMM(q8.to(s.device))(xq.to(s.device)).cpu(), xq.float() @ q8.float().T)
        lines.append(f"W8A8 int8 GEMM {m}x{k} @ {n}x{k}: {'exact' if exact else 'DIFFERS'}")
        assert exact, lines[-1]
        q4 = sparse_like(n, k, gen)
        got = DenseSparse.split(q4.to(s.device))(xq.to(s.device)).cpu()
        exact = torch.equal(got, IntMM(q4.to(s.device))(xq.to(s.device)).cpu())
        lines.append(f"W8A8S int4 + sparse GEMM {m}x{k} @ {n}x{k}: {'exact' if exact else 'DIFFERS'}")
        assert exact, lines[-1]
    return lines


# ---- timings ---------------------------------------------------------------------------------
