"""Prefix caching: requests that share a long system prompt, with the cache on and off, and Hugging
Face transformers on the same prompts in the same run.

    python -m benchmarks.bench_prefix [-m WEIGHT_DIR] [--system_tokens 2000]
        [--requests 3] [--mlgc off random] [--dtype fp32] [--out DIR]

Each request is the same system prompt followed by its own question, sent one after another (greedy,
16 new tokens), to an engine whose cache holds 4 such requests (room for cached blocks and window
snapshots). Prints time to first token per request and cache setting, the ratio of each later
request's to the first's, and whether the greedy outputs with the cache equal those without it.
Writes results/prefix_cache.md.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from atb_llm.config import parse_dtype
from atb_llm.models.qwen2_mlgc.config_qwen2_mlgc import load_qwen2_config
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams
from atb_llm.utils.default_model import resolve_model_path
from benchmarks.common import engine_config, load_hf, markdown_table

HERE = Path(__file__).parent
COLUMNS = ["mlgc", "prefix cache", "request", "prompt tokens", "cached tokens", "ttft_s", "vs first", "same output"]


def prompts(n: int, system_tokens: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(100, min(vocab, 150000)) for _ in range(system_tokens)]
    return [system + [rng.randrange(100, min(vocab, 150000)) for _ in range(40 + 7 * i)] for i in range(n)]


def run_engine(args, mlgc: str, prefix: bool, ps: list[list[int]]) -> list[dict]:
    cfg = engine_config(
        args, max_batch_size=4, max_input_length=max(map(len, ps)), max_output_length=16, mlgc=mlgc,
        prefix_caching=prefix, progress=False,
    )  # fmt: skip
    engine = LLMEngine(cfg)
    engine.warmup()
    rows, bm = [], engine.cache_manager.block_manager
    for i, p in enumerate(ps):
        hits = bm.prefix.hit_tokens if bm.prefix else 0
        t = time.perf_counter()
        (out,) = engine.generate([p], SamplingParams(max_tokens=16))
        row = {"request": i + 1, "prompt tokens": len(p), "ttft_s": out.ttft_s, "tokens": out.token_ids}
        row["cached tokens"] = (bm.prefix.hit_tokens - hits) if bm.prefix else 0
        row["total_s"] = time.perf_counter() - t
        rows.append(row)
    return rows


@torch.inference_mode()
def run_hf(args, ps: list[list[int]]) -> list[dict]:
    model = load_hf(args.model_path, parse_dtype(args.dtype))
    model(torch.tensor([ps[0][:16]]))  # warm up
    rows = []
    for i, p in enumerate(ps):
        t = time.perf_counter()
        model(torch.tensor([p]), logits_to_keep=1)
        rows.append({"request": i + 1, "prompt tokens": len(p), "cached tokens": 0, "ttft_s": time.perf_counter() - t})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system_tokens", type=int, default=2000)
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--plans", nargs="+", default=["off", "random"], help="KV caches to run (off, random, auto, PLAN)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    EngineConfig.add_cli_args(p, dtype="fp32")
    args = p.parse_args()
    args.model_path = str(resolve_model_path(args.model_path))
    ps = prompts(args.requests, args.system_tokens, load_qwen2_config(args.model_path).vocab_size)

    table = []
    for mlgc in args.plans:
        off = run_engine(args, mlgc, False, ps)
        on = run_engine(args, mlgc, True, ps)
        for name, rows in (("off", off), ("on", on)):
            for r, ref in zip(rows, off):
                row = {k: v for k, v in r.items() if k not in ("tokens", "total_s")} | {"mlgc": mlgc}
                row |= {"prefix cache": name, "vs first": f"{r['ttft_s'] / rows[0]['ttft_s']:.2f}x"}
                row["same output"] = "yes" if r["tokens"] == ref["tokens"] else "no"
                table.append(row)
    hf = run_hf(args, ps)
    for r in hf:
        ratio = f"{r['ttft_s'] / hf[0]['ttft_s']:.2f}x"
        table.append(r | {"mlgc": "transformers", "prefix cache": "-", "same output": "-", "vs first": ratio})
    for r in table:
        r["ttft_s"] = round(r["ttft_s"], 3)
    text = markdown_table(table, COLUMNS)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    head = (
        f"{args.requests} requests, one after another: the same {args.system_tokens}-token system prompt, then "
        f"40-{40 + 7 * (args.requests - 1)} tokens of their own; {args.dtype}, greedy, 16 new tokens.\n\n"
    )
    (args.out / "prefix_cache.md").write_text(head + text + "\n")


if __name__ == "__main__":
    main()
