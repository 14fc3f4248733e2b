"""What the benchmarks share: the engine from the command line's flags, and timing one performance
case (batch size, input length, output length) on the engine and on Hugging Face transformers,
measured the same way: first token = the batch's prefill, non-first token = mean decode step, end
to end = batch * output tokens / total seconds."""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams
from atb_llm.utils.default_model import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "models" / "qwen2_5_mlgc" / "configs"  # Qwen2.5 0.5B-72B config.json files


def engine_config(args: argparse.Namespace, **overrides) -> EngineConfig:
    """The engine flags of a parser built with `EngineConfig.add_cli_args` (every engine flag works in
    every benchmark), with the model folder resolved; `overrides` are what the benchmark's case
    fixes (lengths, batch)."""
    return EngineConfig.from_cli_args(args, model_path=str(resolve_model_path(args.model_path)), **overrides)


@dataclass
class PerfResult:
    engine: str
    batch_size: int
    input_length: int
    output_length: int
    first_token_ms: float
    non_first_token_ms: float
    e2e_tokens_per_s: float
    peak_memory_gb: float = 0.0
    kv_cache_gb: float = 0.0

    def row(self) -> dict:
        return asdict(self)


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 150000), (batch, length), generator=gen).tolist()


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure_engine(engine: LLMEngine, batch: int, in_len: int, out_len: int, seed: int = 0) -> PerfResult:
    prompts = random_prompts(batch, in_len, engine.model_config.vocab_size, seed)
    engine.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True))  # warm up at this shape
    params = SamplingParams(max_tokens=out_len, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in prompts]
    step_times, prefill_s = [], 0.0
    start = time.perf_counter()
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t
        if any(len(s.output_token_ids) > 1 for s in seqs):
            step_times.append(dt)
        else:
            prefill_s += dt
    total = time.perf_counter() - start
    decode = sum(step_times) / len(step_times) if step_times else 0.0
    kv = engine.cache_manager.total_bytes / 2**30
    return PerfResult(
        "atb_llm", batch, in_len, out_len, prefill_s * 1000, decode * 1000, batch * out_len / total, peak_rss_gb(), kv
    )


def load_hf(model_path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()


@torch.inference_mode()
def measure_hf(model, batch: int, in_len: int, out_len: int, seed: int = 0) -> PerfResult:
    ids = torch.tensor(random_prompts(batch, in_len, model.config.vocab_size, seed), device=model.device)
    mask = torch.ones_like(ids)

    def run(n):
        t = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t

    run(2)  # warm up
    prefill = run(1)
    total = run(out_len)
    decode = (total - prefill) / max(out_len - 1, 1)
    return PerfResult(
        "transformers",
        batch,
        in_len,
        out_len,
        prefill * 1000,
        decode * 1000,
        batch * out_len / total,
        peak_rss_gb(),
        0.0,
    )


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU's model name (speed figures are ratios measured on it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


MATMUL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_flags() -> str:
    """The instruction sets the CPU kernels choose between (int8 dot products, bf16, AMX), those present."""
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in MATMUL_FLAGS if f in flags) or "none of " + " ".join(MATMUL_FLAGS)


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds: parameters, and the repacked weights kept beside them
    (module attributes, or attributes of a helper object such as W8A8's int8 GEMM), each storage once."""
    seen, total = set(), 0

    def tensors(obj):
        for value in vars(obj).values():
            if isinstance(value, torch.Tensor):
                yield value
            elif isinstance(value, dict):
                yield from (v for v in value.values() if isinstance(v, torch.Tensor))
            elif hasattr(value, "__dict__") and not isinstance(value, (nn.Module, type)):
                yield from (v for v in vars(value).values() if isinstance(v, torch.Tensor))

    for module in model.modules():
        for t in tensors(module):
            if t.is_mkldnn:  # oneDNN's opaque packed weights: no storage to share
                total += t.numel() * t.element_size()
                continue
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def decode_step_ms(engine: LLMEngine, prompts: list[list[int]], steps: int, adapters: list | None = None) -> float:
    """The mean decode step of a batch of `prompts` (each with its LoRA adapter, if any), after its
    prefill and two warm-up steps; the batch then runs to its end."""
    params = SamplingParams(max_tokens=steps + 3, ignore_eos=True)
    seqs = [engine.add_request(p, params, adapter=a) for p, a in zip(prompts, adapters or [None] * len(prompts))]
    while any(len(s.output_token_ids) < 3 for s in seqs):
        engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = (time.perf_counter() - start) / steps
    while engine.has_unfinished():
        engine.step()
    return elapsed * 1000
