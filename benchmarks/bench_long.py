"""One long prompt, prefilled whole or in chunks, with the full cache or an MLGC plan, beside Hugging
Face transformers: first-token time, peak process RSS and KV bytes.

    python -m benchmarks.bench_long [-m WEIGHT_DIR] [--lengths 8192 16384]
        [--chunk 2048] [--mlgc random] [--dtype fp32] [--variants ...] [--out DIR]

Each case runs in its own process; peak RSS is the process's high-water mark during the prefill
(weights included, loading not: the mark is reset after loading). Prints a Markdown table (ratios to
one-piece prefill and to transformers) and writes results/long_context.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from atb_llm.config import parse_dtype
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams
from atb_llm.utils.default_model import resolve_model_path
from benchmarks.common import engine_config, load_hf, markdown_table, random_prompts

HERE = Path(__file__).parent
VARIANTS = {  # name -> (chunked, mlgc); "transformers" is the peer
    "one-piece": (False, "off"),
    "chunked": (True, "off"),
    "chunked + MLGC": (True, None),
    "transformers": None,
}
COLUMNS = ["tokens", "variant", "first_token_s", "vs_one_piece", "vs_transformers", "peak_rss_gib", "kv_mib"]


def reset_peak_rss() -> None:
    """Start the high-water mark of resident memory anew (Linux), so loading does not count."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_gib() -> float:
    """The process's peak resident memory since the last reset (VmHWM)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) / 2**20


def run_case(args) -> dict:
    """One variant at one length, in this process."""
    prompt = random_prompts(1, args.length, 150000, seed=0)[0]
    if args.case == "transformers":
        model = load_hf(args.model_path, parse_dtype(args.dtype))
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            model(ids[:, :16])  # warm up
            reset_peak_rss()
            t = time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1)
            seconds = time.perf_counter() - t
        kv = sum(t.numel() * t.element_size() for lay in out.past_key_values.layers for t in (lay.keys, lay.values))
        return {"first_token_s": seconds, "peak_rss_gib": peak_rss_gib(), "kv_mib": kv / 2**20}
    chunked, mlgc = VARIANTS[args.case]
    cfg = engine_config(
        args, max_batch_size=1, max_input_length=args.length, max_output_length=1,
        max_prefill_tokens=args.chunk if chunked else args.length, chunked_prefill=chunked,
        mlgc=mlgc or args.mlgc, progress=False,
    )  # fmt: skip
    engine = LLMEngine(cfg)
    engine.warmup()
    reset_peak_rss()
    t = time.perf_counter()
    (out,) = engine.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True))
    seconds = time.perf_counter() - t
    kv = sum(row["bytes_peak"] for row in engine.cache_manager.usage_by_level().values())
    return {"first_token_s": seconds, "peak_rss_gib": peak_rss_gib(), "kv_mib": kv / 2**20, "token": out.token_ids[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--chunk", type=int, default=2048, help="max_prefill_tokens of the chunked variants")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=None, help=argparse.SUPPRESS)
    EngineConfig.add_cli_args(p, dtype="fp32", mlgc="random")  # --mlgc: the plan of the MLGC variant
    args = p.parse_args()
    args.model_path = str(resolve_model_path(args.model_path))
    if args.case:
        print(json.dumps(run_case(args)))
        return

    rows = []
    for n in args.lengths:
        by_variant = {}
        for variant in args.variants:
            cmd = [sys.executable, "-m", "benchmarks.bench_long", *sys.argv[1:], "-m", args.model_path]
            cmd += ["--case", variant, "--length", str(n)]  # the same flags, one case
            print(f"{n} tokens, {variant} ...", file=sys.stderr, flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"bench_long: {variant} at {n} tokens failed:\n{done.stderr[-3000:]}")
            by_variant[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        for variant, r in by_variant.items():
            row = {"tokens": n, "variant": variant if "MLGC" not in variant else f"{variant} ({args.mlgc})"}
            row |= {k: round(v, 2) for k, v in r.items() if k != "token"}
            for peer, col in (("one-piece", "vs_one_piece"), ("transformers", "vs_transformers")):
                if peer in by_variant:
                    row[col] = f"{r['first_token_s'] / by_variant[peer]['first_token_s']:.2f}x"
            rows.append(row)
    table = markdown_table(rows, COLUMNS)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    head = (
        f"Prefill of one random prompt, {args.dtype}, chunks of {args.chunk} tokens; `vs_*`: time ratio; "
        "peak RSS during the prefill, weights included.\n\n"
    )
    (args.out / "long_context.md").write_text(head + table + "\n")


if __name__ == "__main__":
    main()
