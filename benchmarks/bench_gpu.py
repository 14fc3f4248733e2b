"""The CUDA path in one call: every GPU kernel checked against the torch reference, then the whole
model timed against Hugging Face transformers on the same random weights.

    python -m benchmarks.bench_gpu                      # CUDA: Qwen2.5-7B shapes
    python -m benchmarks.bench_gpu --config CONFIG.json # another shape
    TRITON_INTERPRET=1 python -m benchmarks.bench_gpu  # no CUDA: a tiny config

Weights are random (normal, as transformers initialises them): transformers builds the model from
config.json on the device and the engine loads the same tensors, so both compute the same
function. The engine runs the triton backend: paged MLGC decode attention and, for the quantized
rows, the Triton weight-only GEMM (W8A16 / W4A16 made at load from the same weights).

Checks: decode attention and the cache write of every MLGC level (int8 included), with RoPE of q
and k fused into the write, against TorchBackend, and the weight-only GEMM (int8, int4 groups of
128) and the int8 GEMM against fp32 references. Timings (one Markdown table): decode ms per step at
batch 1 and 8 after 256 prompt tokens, first-token time at 2048, batch-16 decode at 32K with the
full cache and with MLGC 0.25 (a random plan of the calibrated plans' budget: a quarter of the
groups full, the rest windows of sink 64 + recent 1024, grown to whole blocks), W8A16 and W4A16
batch-1 decode, and on CUDA batch-1 decode without CUDA graphs (`enforce_eager`). Per row: the
bytes a step must read (weights of the linears and the LM head, plus the K/V slots attention
reads), the GB/s that makes, and the ratio to transformers (its time over the engine's; for the
quantized rows, to its bf16 batch-1 decode). Without CUDA, the same code runs on CPU tensors under
Triton's interpreter at a tiny config and small lengths (fp32), so CI proves the command runs; its
times say nothing of a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from atb_llm.cache.cache_manager import CacheConfig, CacheManager
from atb_llm.compression.layout import GroupLayout
from atb_llm.compression.levels import make_level
from atb_llm.compression.plan import baseline_plan
from atb_llm.config import ModelConfig
from atb_llm.layers.attention.metadata import AttentionMetadata
from atb_llm.layers.attention.torch_backend import TorchBackend
from atb_llm.layers.attention.triton_backend import TritonBackend
from atb_llm.layers.linear import LinearBase
from atb_llm.layers.rotary import RotaryEmbedding
from atb_llm.models.qwen2_mlgc.config_qwen2_mlgc import load_qwen2_config
from atb_llm.quantization.w4a16 import pack_int4, quantize_w4_groups
from atb_llm.quantization.w8a8 import IntMM
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.model_runner import ModelRunner
from atb_llm.runtime.sequence import SamplingParams, Sequence
from atb_llm.utils.default_model import resolve_model_path
from benchmarks.common import markdown_table, measure_engine, measure_hf

HERE = Path(__file__).resolve().parent
CONFIG_7B = HERE / "configs" / "qwen2.5-7b-instruct.json"
LEVELS = ("full", "window", "full_int8", "window_int8")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json")


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
    a = ModelRunner(None, cm).prepare(seqs, is_prefill=False)
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
    return lines


# ---- timings ---------------------------------------------------------------------------------


def model_folder(config: dict, folder: Path) -> Path:
    """config.json and the default model's tokenizer: what the engine reads besides the weights."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    source = resolve_model_path(None)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    return folder


def hf_model(folder: Path, s: Setup):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(s.device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=s.dtype)
    return model.eval()


def engine(
    folder: Path, s: Setup, hf, batch: int, context: int, out: int, quantize=None, layout=None, eager=False
) -> LLMEngine:
    cfg = EngineConfig(
        str(folder), dtype={torch.bfloat16: "bf16", torch.float16: "fp16"}.get(s.dtype, "fp32"), device=s.device,
        max_batch_size=batch, max_input_length=context, max_output_length=out + 2, block_size=s.block_size,
        quantize=quantize, attention_backend="triton", progress=False, chunked_prefill=True,
        max_prefill_tokens=min(context, 8192), enforce_eager=eager,
    )  # fmt: skip
    return LLMEngine(cfg, layout=layout, weights=iter(hf.state_dict().items()))


def linear_bytes(model) -> int:
    """Bytes of every tensor a decode step reads from the linears and the LM head (weights in their
    stored form, scales, packed copies), each tensor once."""
    seen: dict[int, int] = {}
    for m in model.modules():
        if isinstance(m, LinearBase):
            for v in [*m.parameters(recurse=False), *vars(m).values()]:
                for t in v if isinstance(v, tuple) else (v,):
                    if isinstance(t, torch.Tensor) and not t.is_mkldnn:
                        seen[id(t)] = t.nbytes
    return sum(seen.values())


def kv_bytes(eng: LLMEngine, batch: int, context: int) -> int:
    """K/V bytes one decode step reads at `context` tokens per sequence, over every group."""
    n = torch.tensor([context])
    head_dim = eng.model_config.head_dim
    total = 0
    for level in eng.layout.levels:
        slot = head_dim * (1 if level.int8 else eng.dtype.itemsize) + (4 if level.int8 else 0)
        total += int(level.read_len(n)) * 2 * slot * batch
    return total


def row(case: str, ms: float, nbytes: int, hf_ms: float | None, hf_note: str = "") -> dict:
    return {
        "case": case,
        "atb_llm (ms)": f"{ms:.2f}",
        "transformers (ms)": "-" if hf_ms is None else f"{hf_ms:.2f}{hf_note}",
        "speedup vs transformers": "-" if hf_ms is None else f"{hf_ms / ms:.2f}x",
        "bytes read per step (MB)": f"{nbytes / 1e6:.2f}",
        "achieved GB/s": f"{nbytes / ms / 1e6:.1f}",
    }


def timings(s: Setup, c: ModelConfig, folder: Path, progress) -> list[dict]:
    hf = hf_model(folder, s)
    rows, hf_bs1 = [], None
    for batch in (1, 8):
        progress(f"decode batch {batch}")
        eng = engine(folder, s, hf, batch, s.short, s.steps)
        ours = measure_engine(eng, batch, s.short, s.steps)
        theirs = measure_hf(hf, batch, s.short, s.steps)
        hf_bs1 = hf_bs1 or theirs.non_first_token_ms
        nbytes = linear_bytes(eng.model) + kv_bytes(eng, batch, s.short)
        rows.append(row(f"decode, batch {batch}, {s.short} in (ms/step)", ours.non_first_token_ms, nbytes,
                        theirs.non_first_token_ms))  # fmt: skip
        if batch == 1:
            weights = linear_bytes(eng.model)
            progress(f"first token at {s.first}")
            eng = engine(folder, s, hf, 1, s.first, 2)
            ours = measure_engine(eng, 1, s.first, 2)
            theirs = measure_hf(hf, 1, s.first, 2)
            rows.append(row(f"first token, {s.first} in (ms)", ours.first_token_ms, weights, theirs.first_token_ms))
        del eng
    if s.device == "cuda":  # what the CUDA graphs save
        progress("decode batch 1 without CUDA graphs")
        eng = engine(folder, s, hf, 1, s.short, s.steps, eager=True)
        ours = measure_engine(eng, 1, s.short, s.steps)
        nbytes = linear_bytes(eng.model) + kv_bytes(eng, 1, s.short)
        rows.append(row(f"decode, batch 1, {s.short} in, no CUDA graphs (ms/step)", ours.non_first_token_ms, nbytes,
                        hf_bs1))  # fmt: skip
        del eng
    for quant in ("w8a16", "w4a16"):
        progress(f"{quant} decode")
        eng = engine(folder, s, hf, 1, s.short, s.steps, quantize=quant)
        ours = measure_engine(eng, 1, s.short, s.steps)
        nbytes = linear_bytes(eng.model) + kv_bytes(eng, 1, s.short)
        rows.append(row(f"{quant.upper()} decode, batch 1, {s.short} in (ms/step)", ours.non_first_token_ms, nbytes,
                        hf_bs1, " (bf16)" if s.dtype == torch.bfloat16 else " (float)"))  # fmt: skip
        del eng
    plan = baseline_plan("random", c, s.block_size, s.sink, s.recent, full_ratio=0.25).to_layout()
    for name, layout in (("full cache", None), ("MLGC 0.25", plan)):  # transformers has no figure here
        progress(f"decode batch {s.long_batch} at {s.long}, {name}")
        eng = engine(folder, s, hf, s.long_batch, s.long, s.steps, layout=layout)
        ours = measure_engine(eng, s.long_batch, s.long, s.steps)
        nbytes = linear_bytes(eng.model) + kv_bytes(eng, s.long_batch, s.long)
        rows.append(row(f"decode, batch {s.long_batch} at {s.long}, {name} (ms/step)", ours.non_first_token_ms,
                        nbytes, None))  # fmt: skip
        del eng
    return rows


def attention_levels(s: Setup, c: ModelConfig, contexts: list[int], batches: list[int]) -> list[dict]:
    """CUDA only: one layer's decode attention per level (do_bench)."""
    from triton.testing import do_bench

    backend, rows = TritonBackend(), []
    for ctx in contexts:
        for b in batches:
            for name in LEVELS:
                level = make_level(name, s.sink, s.recent)
                kv, meta = decode_step(s, c, [level] * c.num_groups, [ctx] * b)
                q = torch.randn(b, c.num_attention_heads, c.head_dim, device=s.device, dtype=s.dtype)
                ms = do_bench(lambda kv=kv, meta=meta, q=q: backend.decode(q, kv, 0, meta, c.head_dim**-0.5))
                slot = c.head_dim * (1 if level.int8 else 2) + (4 if level.int8 else 0)
                nbytes = int(level.read_len(torch.tensor([ctx]))) * b * c.num_key_value_heads * 2 * slot
                rows.append(dict(level=name, context=ctx, batch=b, **{"KV read, one layer (MB)": f"{nbytes / 1e6:.1f}",
                            "us": f"{ms * 1e3:.1f}", "GB/s": f"{nbytes / ms / 1e6:.0f}"}))  # fmt: skip
                del kv, meta
                torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=None, help=f"config.json of the shapes (CUDA default: {CONFIG_7B})")
    ap.add_argument("--random-weights", action="store_true", help="accepted for clarity: weights are always random")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--out", type=Path, default=None, help="also write the report (Markdown) here")
    args = ap.parse_args(argv)
    s = make_setup(args.config, args.device)
    card = torch.cuda.get_device_name() if s.device == "cuda" else "CPU, Triton interpreter (TRITON_INTERPRET=1)"
    start = time.perf_counter()

    def progress(what: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {what}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(s.config, Path(tmp) / "model")
        c = load_qwen2_config(folder)
        progress(f"{card}: checks")
        checks = check_attention(s, c) + check_gemm(s)
        rows = timings(s, c, folder, progress)
        if s.device == "cuda":
            levels = attention_levels(s, c, [8192, s.long], [1, 8])
    title = (
        f"{card}; {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads}/"
        f"{c.num_key_value_heads} heads, random weights, {str(s.dtype).removeprefix('torch.')}, torch "
        f"{torch.__version__}, block {s.block_size}, {s.steps} decode steps per row"
    )
    report = "\n".join(["## Checks", "", *[f"- {line}" for line in checks], "", "## Timings", "", title, ""])
    report += markdown_table(rows, list(rows[0])) + "\n"
    if s.device == "cuda":
        report += "\n## Decode attention per level, one layer\n\n" + markdown_table(levels, list(levels[0])) + "\n"
    report += f"\ntotal {time.perf_counter() - start:.0f} s\n"
    print("\n" + report)
    if args.out:
        args.out.write_text(report, encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
