"""Quantized checkpoints against the float one and against Hugging Face transformers, same run:
resident weight bytes, batch-1 decode time per token, first-token time.

    python -m benchmarks.bench_quant --float DIR --variants w8a16=Q1 w4a16=Q2 ... \
        [--input 256] [--output 32] [--prefill 512] [--dtype bf16|fp32] [--llama_cpp [GGUF]]

A variant ending in `:lm_head=w4a16` (or w8a16) also quantizes the LM head at load
(--quantize_lm_head). --llama_cpp adds the CPU peer a user of these formats would pick instead: llama.cpp
(llama-cpp-python, `pip install -e '.[llama]'`, built from source) on a GGUF file, by default the
default model's own Q4_K_M, with the same prompt ids, threads and lengths.

Prints a Markdown table and writes results/quant_perf.md and results/quant_perf.png.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

import torch
from tqdm import tqdm

from atb_llm.config import parse_dtype
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.utils.default_model import ensure_default_gguf, resolve_model_path
from benchmarks.common import (
    cpu_flags,
    cpu_name,
    load_hf,
    markdown_table,
    measure_engine,
    measure_hf,
    random_prompts,
    resident_bytes,
)

HERE = Path(__file__).parent
COLUMNS = ["variant", "weights_mib", "weights_vs_float", "decode_ms", "speedup_vs_float", "speedup_vs_hf"]
COLUMNS += ["first_token_ms_at_prefill", "first_token_vs_float"]


@dataclass
class Subject:
    """One row: how to time a decode step and a first token, each call one pass."""

    name: str
    weights_mib: float | None
    decode: Callable[[], float]
    first: Callable[[], float] | None
    decode_ms: list[float] = field(default_factory=list)
    first_ms: list[float] = field(default_factory=list)


def engine_subject(name: str, path: str, args, quantize: str | None = None, lm_head: str | None = None) -> Subject:
    cfg = EngineConfig(
        path, max_batch_size=1, max_input_length=max(args.input, args.prefill), max_output_length=args.output,
        quantize=quantize, quantize_lm_head=lm_head, progress=False, dtype=args.dtype,
    )  # fmt: skip
    engine = LLMEngine(cfg)
    engine.warmup()
    return Subject(
        name,
        resident_bytes(engine.model) / 2**20,
        lambda: measure_engine(engine, 1, args.input, args.output).non_first_token_ms,
        lambda: measure_engine(engine, 1, args.prefill, 2).first_token_ms,
    )


def llama_cpp_subject(gguf: Path, vocab: int, args) -> Subject:
    """llama.cpp at batch 1: the prompt evaluated in one call, then each greedy token fed back (its
    logits read, as the engine samples), on the engine's prompt ids."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit(
            "--llama_cpp needs llama-cpp-python: pip install -e '.[llama]' (it builds llama.cpp)"
        ) from None
    ctx = max(args.input + args.output, args.prefill) + 8
    llm = Llama(model_path=str(gguf), n_ctx=ctx, n_threads=torch.get_num_threads(), n_batch=512, verbose=False)

    def run(prompt: list[int], tokens: int) -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        first, steps = time.perf_counter() - start, []
        for _ in range(tokens - 1):
            token = int(llm.scores[llm.n_tokens - 1].argmax())
            t = time.perf_counter()
            llm.eval([token])
            steps.append(time.perf_counter() - t)
        return first * 1e3, sum(steps) / max(len(steps), 1) * 1e3

    name = f"llama.cpp {gguf.stem.rsplit('-', 1)[-1]}" if "-Q" in gguf.stem else f"llama.cpp {gguf.name}"
    return Subject(
        name,
        gguf.stat().st_size / 2**20,
        lambda: run(random_prompts(1, args.input, vocab)[0], args.output)[1],
        lambda: run(random_prompts(1, args.prefill, vocab)[0], 1)[0],
    )


def time_in_rounds(subjects: list[Subject], repeats: int) -> None:
    """One untimed pass each (page faults, allocator growth: 3-4x the steady step on the 2-core
    machine), then `repeats` rounds over every subject in turn, so that a slow spell of a shared
    machine falls on all rows alike instead of on whichever was running."""
    for s in subjects:
        s.decode()
    for _ in tqdm(range(repeats), desc="rounds"):
        for s in subjects:
            s.decode_ms.append(s.decode())
            if s.first is not None:
                s.first_ms.append(s.first())


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [r["variant"] for r in rows]
    axes[0].bar(names, [r["weights_mib"] for r in rows], color="#4878a8")
    axes[0].set_ylabel("resident weights (MiB)")
    axes[1].bar(names, [r["decode_ms"] for r in rows], color="#d08040")
    axes[1].set_ylabel("batch-1 decode (ms/token)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--float", dest="float_path", default=None, help="the float folder (default: the default model)")
    ap.add_argument("--variants", nargs="*", default=[],
                    help="NAME=FOLDER (msModelSlim output) or NAME=load:w8a16 [:lm_head=w8a16|w4a16]")  # fmt: skip
    ap.add_argument("--input", type=int, default=256)
    ap.add_argument("--output", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=512, help="prompt length of the first-token column")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="compute dtype, transformers too")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per figure; the median is reported")
    ap.add_argument("--no_hf", action="store_true")
    ap.add_argument("--llama_cpp", nargs="?", const="default", default=None, metavar="GGUF",
                    help="add llama.cpp on this GGUF file (no value: the default model's Q4_K_M)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    float_path = str(resolve_model_path(args.float_path))
    subjects = [engine_subject(args.dtype, float_path, args)]
    for spec in args.variants:
        name, _, where = spec.partition("=")
        where, _, lm_head = where.partition(":lm_head=")
        if where.startswith("load:"):
            subjects.append(engine_subject(name, float_path, args, where.removeprefix("load:"), lm_head or None))
        else:
            subjects.append(engine_subject(name, where, args, lm_head=lm_head or None))
    if args.llama_cpp:
        gguf = ensure_default_gguf() if args.llama_cpp == "default" else Path(args.llama_cpp)
        vocab = json.loads((Path(float_path) / "config.json").read_text())["vocab_size"]  # the engine's prompt ids
        subjects.append(llama_cpp_subject(gguf, vocab, args))
    if not args.no_hf:
        model = load_hf(float_path, parse_dtype(args.dtype))
        hf = Subject(f"transformers {args.dtype}", None,
                     lambda: measure_hf(model, 1, args.input, args.output).non_first_token_ms, None)  # fmt: skip
        subjects.append(hf)
    time_in_rounds(subjects, args.repeats)
    rows = [{"variant": s.name, "weights_mib": s.weights_mib, "decode_ms": median(s.decode_ms),
             "first_token_ms_at_prefill": median(s.first_ms) if s.first_ms else None} for s in subjects]  # fmt: skip
    base, hf_ms = rows[0], None if args.no_hf else rows[-1]["decode_ms"]
    for r in rows:
        r["speedup_vs_float"] = base["decode_ms"] / r["decode_ms"]
        if hf_ms is not None:
            r["speedup_vs_hf"] = hf_ms / r["decode_ms"]
        if r["weights_mib"] is not None:
            r["weights_vs_float"] = r["weights_mib"] / base["weights_mib"]
            r["first_token_vs_float"] = base["first_token_ms_at_prefill"] / r["first_token_ms_at_prefill"]
    if hf_ms is not None:
        rows[-1] = {k: v for k, v in rows[-1].items() if v is not None and k != "speedup_vs_float"}
    head = (
        f"CPU: {cpu_name()} ({cpu_flags()}); "
        f"{args.dtype}, bs1, input {args.input}, output {args.output}; first token at {args.prefill} tokens; "
        f"threads {torch.get_num_threads()}; median of {args.repeats} rounds over every row; ratios: decode "
        "speed (float or transformers decode ms / this), first token (float ms / this)\n\n"
    )
    table = markdown_table(rows, COLUMNS)
    print("\n" + head + table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "quant_perf" if args.dtype == "bf16" else f"quant_perf_{args.dtype}"
    (args.out / f"{stem}.md").write_text(head + table + "\n")
    plot([r for r in rows if r.get("weights_mib") is not None], args.out / f"{stem}.png")
    return rows


if __name__ == "__main__":
    main()
