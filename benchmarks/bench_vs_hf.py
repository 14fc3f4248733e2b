"""Engine against Hugging Face transformers: same model, same machine, same run.

    python -m benchmarks.bench_vs_hf [--model_path DIR] [--dtype bf16] [--cases 1,256,64 4,256,64 8,256,64]

Each case is batch,input_length,output_length. Prints a Markdown table with the ratio of each
engine case to transformers at the same case, and to transformers at batch 1.
"""

from __future__ import annotations

import argparse
import gc

import torch

from atb_llm.config import parse_dtype
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.utils.default_model import resolve_model_path
from benchmarks.common import engine_config, load_hf, markdown_table, measure_engine, measure_hf

COLUMNS = [
    "batch_size",
    "input_length",
    "output_length",
    "engine",
    "first_token_ms",
    "non_first_token_ms",
    "e2e_tokens_per_s",
    "speedup_vs_hf",
    "speedup_vs_hf_batch1",
]


def parse_case(text: str) -> tuple[int, int, int]:
    try:
        b, i, o = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"case {text!r} must be batch,input_length,output_length") from None
    return b, i, o


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", type=parse_case, default=[(1, 256, 64), (4, 256, 64), (8, 256, 64)])
    ap.add_argument("--no_hf", action="store_true", help="engine only")
    EngineConfig.add_cli_args(ap, dtype="bf16")
    args = ap.parse_args(argv)
    path = str(resolve_model_path(args.model_path))
    torch.manual_seed(0)

    max_b = max(b for b, _, _ in args.cases)
    max_in = max(i for _, i, _ in args.cases)
    max_out = max(o for _, _, o in args.cases)
    engine = LLMEngine(
        engine_config(
            args,
            max_batch_size=max_b,
            max_input_length=max_in,
            max_output_length=max_out,
            max_prefill_tokens=max_b * max_in,
        )
    )
    engine.warmup()
    ours = [measure_engine(engine, *case).row() for case in args.cases]
    del engine
    gc.collect()
    hf = {}
    if not args.no_hf:
        model = load_hf(path, parse_dtype(args.dtype))
        for case in sorted(set(args.cases) | {(1, c[1], c[2]) for c in args.cases}):
            hf[case] = measure_hf(model, *case).row()
    rows = []
    for case, row in zip(args.cases, ours):
        ref, ref1 = hf.get(case), hf.get((1, case[1], case[2]))
        if ref:
            row["speedup_vs_hf"] = row["e2e_tokens_per_s"] / ref["e2e_tokens_per_s"]
            row["speedup_vs_hf_batch1"] = row["e2e_tokens_per_s"] / ref1["e2e_tokens_per_s"]
        rows.append(row)
    rows += [hf[c] for c in sorted(hf)]
    print(f"\nmodel: {path}  dtype: {args.dtype}  threads: {torch.get_num_threads()}\n")
    print(markdown_table(rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main()
