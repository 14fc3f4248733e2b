"""Quantized checkpoints against the float one and against Hugging Face transformers, same run:
resident weight bytes, batch-1 decode time per token, first-token time.

    python -m benchmarks.bench_quant --float DIR --variants w8a16=Q1 w4a16=Q2 ... \
        [--input 256] [--output 32] [--prefill 512] [--dtype bf16|fp32] [--llama_cpp [GGUF]]

--llama_cpp adds the CPU peer a user of these formats would pick instead: llama.cpp
(llama-cpp-python, `pip install -e '.[llama]'`, built from source) on a GGUF file, by default the
default model's own Q4_K_M, with the same prompt ids, threads and lengths.

Prints a Markdown table and writes results/quant_perf.md and results/quant_perf.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

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


def measure(name: str, path: str, args, quantize: str | None = None) -> dict:
    cfg = EngineConfig(
        path, max_batch_size=1, max_input_length=max(args.input, args.prefill), max_output_length=args.output,
        quantize=quantize, progress=False, dtype=args.dtype,
    )  # fmt: skip
    engine = LLMEngine(cfg)
    engine.warmup()
    # the first pass at a shape pays page faults and allocator growth (3-4x the steady step on the
    # 2-core CPU machine): time the second
    decode = [measure_engine(engine, 1, args.input, args.output) for _ in range(2)][-1]
    prefill = measure_engine(engine, 1, args.prefill, 2)
    row = {
        "variant": name,
        "weights_mib": resident_bytes(engine.model) / 2**20,
        "decode_ms": decode.non_first_token_ms,
        "first_token_ms_at_prefill": prefill.first_token_ms,
    }
    del engine
    gc.collect()
    return row


def measure_llama_cpp(gguf: Path, vocab: int, args) -> dict:
    """llama.cpp at batch 1: the prompt evaluated in one call, then each greedy token fed back (its
    logits read, as the engine samples); the second pass at each shape is timed, as for the engine."""
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

    decode = [run(random_prompts(1, args.input, vocab)[0], args.output) for _ in range(2)][-1][1]
    first = [run(random_prompts(1, args.prefill, vocab)[0], 1) for _ in range(2)][-1][0]
    name = f"llama.cpp {gguf.stem.rsplit('-', 1)[-1]}" if "-Q" in gguf.stem else f"llama.cpp {gguf.name}"
    return {"variant": name, "weights_mib": gguf.stat().st_size / 2**20, "decode_ms": decode,
            "first_token_ms_at_prefill": first}  # fmt: skip


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
    ap.add_argument("--variants", nargs="*", default=[], help="NAME=FOLDER (msModelSlim output) or NAME=load:w8a16")
    ap.add_argument("--input", type=int, default=256)
    ap.add_argument("--output", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=512, help="prompt length of the first-token column")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="compute dtype, transformers too")
    ap.add_argument("--no_hf", action="store_true")
    ap.add_argument("--llama_cpp", nargs="?", const="default", default=None, metavar="GGUF",
                    help="add llama.cpp on this GGUF file (no value: the default model's Q4_K_M)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    float_path = str(resolve_model_path(args.float_path))
    rows = [measure(args.dtype, float_path, args)]
    for spec in args.variants:
        name, _, where = spec.partition("=")
        if where.startswith("load:"):
            rows.append(measure(name, float_path, args, quantize=where.removeprefix("load:")))
        else:
            rows.append(measure(name, where, args))
    if args.llama_cpp:
        gguf = ensure_default_gguf() if args.llama_cpp == "default" else Path(args.llama_cpp)
        vocab = json.loads((Path(float_path) / "config.json").read_text())["vocab_size"]  # the engine's prompt ids
        rows.append(measure_llama_cpp(gguf, vocab, args))
    hf = None
    if not args.no_hf:
        model = load_hf(float_path, parse_dtype(args.dtype))
        hf = [measure_hf(model, 1, args.input, args.output) for _ in range(2)][-1]  # as for the engine
    base = rows[0]
    for r in rows:
        r["weights_vs_float"] = r["weights_mib"] / base["weights_mib"]
        r["speedup_vs_float"] = base["decode_ms"] / r["decode_ms"]
        r["first_token_vs_float"] = base["first_token_ms_at_prefill"] / r["first_token_ms_at_prefill"]
        if hf is not None:
            r["speedup_vs_hf"] = hf.non_first_token_ms / r["decode_ms"]
    if hf is not None:
        rows.append({"variant": f"transformers {args.dtype}", "decode_ms": hf.non_first_token_ms, "speedup_vs_hf": 1.0})
    head = (
        f"CPU: {cpu_name()} ({cpu_flags()}); "
        f"{args.dtype}, bs1, input {args.input}, output {args.output}; first token at {args.prefill} tokens; "
        f"threads {torch.get_num_threads()}; ratios: decode speed (float or transformers decode ms / this), "
        "first token (float ms / this)\n\n"
    )
    table = markdown_table(rows, COLUMNS)
    print("\n" + head + table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "quant_perf" if args.dtype == "bf16" else f"quant_perf_{args.dtype}"
    (args.out / f"{stem}.md").write_text(head + table + "\n")
    plot([r for r in rows if "weights_mib" in r], args.out / f"{stem}.png")
    return rows


if __name__ == "__main__":
    main()
