"""The CUDA path in one call: every GPU kernel checked against the torch reference, then the whole
model timed against Hugging Face transformers on the same random weights.

    python -m benchmarks.bench_gpu                      # CUDA: Qwen2.5-7B shapes
    python -m benchmarks.bench_gpu --config CONFIG.json # another shape
    TRITON_INTERPRET=1 python -m benchmarks.bench_gpu  # no CUDA: a tiny config

Weights are random (normal, as transformers initialises them): transformers builds the model from
config.json on the device and the engine loads the same tensors, so both compute the same
function. The engine runs the triton backend: paged MLGC decode attention and, for the quantized
rows, the Triton weight-only GEMM (W8A16 / W4A16 made at load from the same weights).

Checks: decode attention and the cache write of every MLGC level (int8 included), with RoPE of q and
k fused into the write, against TorchBackend, and the weight-only GEMM (int8, int4 groups of 128)
and the int8 GEMM against fp32 references, W8A8S's int4 + sparse GEMM against the int8 one. Timings
(one Markdown table): decode ms per step at batch 1 and 8 after 256 prompt tokens, first-token time
at 2048, batch-16 decode at 32K with the full cache and with MLGC 0.25 (a random plan of the
calibrated plans' budget: a quarter of the groups full, the rest windows of sink 64 + recent 1024,
grown to whole blocks), W8A16 and W4A16 batch-1 decode, W8A8S's gate/up GEMM on int8 and on int4 +
sparse storage, and on CUDA batch-1 decode without CUDA graphs (`enforce_eager`). Per row: the bytes
a step must read (weights of the linears and the LM head, plus the K/V slots attention reads), the
GB/s that makes, and the ratio to transformers (its time over the engine's; for the quantized rows,
to its bf16 batch-1 decode). Without CUDA, the same code runs on CPU tensors under Triton's
interpreter at a tiny config and small lengths (fp32), so CI proves the command runs; its times say
nothing of a GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from atb_llm.compression.levels import make_level
from atb_llm.compression.plan import baseline_plan
from atb_llm.config import ModelConfig
from atb_llm.layers.attention.triton_backend import TritonBackend
from atb_llm.layers.linear import LinearBase
from atb_llm.models.qwen2_mlgc.config_qwen2_mlgc import load_qwen2_config
from atb_llm.quantization.dense_sparse import DenseSparse
from atb_llm.quantization.w8a8 import IntMM
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.utils.default_model import resolve_model_path
from benchmarks.common import markdown_table, measure_engine, measure_hf
from benchmarks.gpu_checks import (
    CONFIG_7B,
    LEVELS,
    Setup,
    check_attention,
    check_gemm,
    decode_step,
    make_setup,
    sparse_like,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json")


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
    rows += sparse_gemm_rows(s, progress)
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


def sparse_gemm_rows(s: Setup, progress) -> list[dict]:
    """W8A8S's gate/up product at batch 1: the int8 GEMM on int8 storage against the int4 + sparse
    outliers storage (half the bytes), one linear, the mean of `steps` calls."""
    progress("W8A8S gate/up GEMM, int8 vs int4 + sparse")
    k, n = s.config["hidden_size"], 2 * s.config["intermediate_size"]
    gen = torch.Generator().manual_seed(1)
    q = sparse_like(n, k, gen).to(s.device)
    xq = torch.randint(-128, 128, (1, k), generator=gen, dtype=torch.int16).to(s.device)
    split = DenseSparse.split(q)
    rows = []
    for name, gemm, nbytes in (("int8", IntMM(q), q.nbytes), ("int4 + sparse", split, split.nbytes)):
        gemm(xq)
        sync = torch.cuda.synchronize if s.device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(s.steps):
            gemm(xq)
        sync()
        ms = (time.perf_counter() - t0) / s.steps * 1e3
        rows.append(row(f"W8A8S gate/up GEMM {n}x{k}, batch 1, {name} (ms)", ms, nbytes, None))
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
