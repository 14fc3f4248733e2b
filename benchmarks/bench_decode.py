"""Decode speed at long context: MLGC against the full cache, same engine, same run.

    python -m benchmarks.bench_decode [--context 8192] [--batch 1 4] [--plans PLAN ...]

Prefills `batch` sequences of `context` random tokens, then times `--steps` decode steps. Window
groups read their ring of blocks instead of the whole history, so decode reads fewer bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from atb_llm.compression.plan import MlgcPlan
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from benchmarks.common import decode_step_ms, engine_config, markdown_table, random_prompts

HERE = Path(__file__).parent


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument(
        "--plans",
        nargs="*",
        type=Path,
        default=None,
        help="plans to time (default: results/plan_razor_0.25.json and 0.5 if present)",
    )
    ap.add_argument("--out", type=Path, default=HERE / "results")
    EngineConfig.add_cli_args(ap)
    args = ap.parse_args(argv)
    plans = args.plans if args.plans is not None else sorted(args.out.glob("plan_razor_*.json"))
    caches = {"full cache": None} | {p.stem: MlgcPlan.load(p) for p in plans}
    rows = []
    for name, plan in caches.items():
        cfg = engine_config(
            args,
            max_batch_size=max(args.batch),
            max_input_length=args.context,
            max_output_length=args.steps + 3,
            max_prefill_tokens=args.context,
            progress=False,
        )
        engine = LLMEngine(cfg, layout=plan.to_layout() if plan else None)
        for batch in args.batch:
            rows.append(
                {
                    "cache": name,
                    "batch": batch,
                    "context": args.context,
                    "decode ms/token": decode_step_ms(
                        engine, random_prompts(batch, args.context, engine.model_config.vocab_size), args.steps
                    ),
                }
            )
        del engine
    base = {r["batch"]: r["decode ms/token"] for r in rows if r["cache"] == "full cache"}
    for r in rows:
        r["speedup"] = base[r["batch"]] / r["decode ms/token"]
    text = f"Decode at {args.context} tokens of context, bf16, {torch.get_num_threads()} threads\n\n"
    text += markdown_table(rows, ["cache", "batch", "context", "decode ms/token", "speedup"]) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
