"""Quantized checkpoints against the float one and against Hugging Face transformers, same run:
resident weight bytes, batch-1 decode time per token, first-token time.

    python -m benchmarks.bench_quant --float DIR --variants w8a16=Q1 w4a16=Q2 ... \
        [--input 256] [--output 32] [--prefill 512] [--dtype bf16|fp32]

Prints a Markdown table and writes results/quant_perf.md and results/quant_perf.png.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch

from atb_llm.config import parse_dtype
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.utils.default_model import resolve_model_path
from benchmarks.common import load_hf, markdown_table, measure_engine, measure_hf, resident_bytes

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
