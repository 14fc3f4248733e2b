"""Tensor parallel: world size 1 against 2 on this machine, and what a rank holds at Qwen2.5-7B and 72B.

    python -m benchmarks.bench_tp [-m WEIGHT_DIR] [--batch 1 8] [--context 512] [--steps 16]
    python -m benchmarks.bench_tp --paper          # the per-rank table from the configs alone

measured: for world size 1 and 2 (torchrun, gloo, one thread a rank, the same requests): first
token of a `--context`-token prompt, the mean decode step at each batch size, each rank's resident
weight and KV bytes, and the share of a decode step spent in the all-reduces (timed around each).

paper: for Qwen2.5-7B at world size 2 and 72B at 8 (configs/), in bf16: weight bytes per rank
(sharded linears / N + the whole embedding and norms), KV bytes per rank per token, all-reduce
bytes a rank sends per token (two a layer, ring: 2 (N - 1) / N of the hidden state each), and the
bandwidth floor of a batch-1 decode step per card at 8K tokens of context, (weights + KV read) /
HBM bandwidth, for an Ascend 910B and an H100 (bandwidths as given by --hbm, from their data
sheets). Results: results/tensor_parallel.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import CONFIGS, cpu_name, markdown_table, random_prompts, resident_bytes

HERE = Path(__file__).parent
HBM = {"Ascend 910B": 1.6e12, "H100 SXM": 3.35e12}  # bytes/s, data-sheet figures
PAPER = [("qwen2.5-7b-instruct", 2), ("qwen2.5-72b-instruct", 8)]


def paper_rows(context: int = 8192) -> list[dict]:
    rows = []
    for name, world in PAPER:
        c = json.loads((CONFIGS / f"{name}.json").read_text())
        h, layers, inter, vocab = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
        heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
        d = h // heads
        attn = h * (heads * d) + 2 * h * (kv_heads * d) + (heads + 2 * kv_heads) * d + (heads * d) * h
        mlp = 3 * h * inter
        sharded = layers * (attn + mlp) + (0 if c.get("tie_word_embeddings") else vocab * h)
        whole = vocab * h + layers * 2 * h + h  # embedding and norms
        weights = 2 * (sharded / world + whole)
        kv_token = 2 * layers * (kv_heads // world) * d * 2  # K and V, bf16
        allreduce = layers * 2 * (2 * (world - 1) / world) * h * 2
        row = {
            "model": name.removesuffix("-instruct"),
            "world size": world,
            "weights / rank (GiB)": f"{weights / 2**30:.2f}",
            "KV / rank / token (KiB)": f"{kv_token / 2**10:.1f}",
            "all-reduce sent / token (KiB)": f"{allreduce / 2**10:.0f}",
        }
        for card, bw in HBM.items():
            row[f"decode floor {card} (ms)"] = f"{(weights + kv_token * context) / bw * 1e3:.2f}"
        rows.append(row)
    return rows


def worker(args) -> None:
    """One rank: the measurements, written by rank 0 (and each rank's bytes) to args.out."""
    from atb_llm.layers.parallel import TensorParallel
    from atb_llm.runtime.engine import EngineConfig, LLMEngine
    from atb_llm.runtime.sequence import SamplingParams
    from atb_llm.utils.distributed import init_tensor_parallel, leave_tensor_parallel

    torch.set_grad_enabled(False)
    init_tensor_parallel("cpu")
    spent = [0.0]
    original = TensorParallel.all_reduce

    def timed(self, x):
        start = time.perf_counter()
        out = original(self, x)
        spent[0] += time.perf_counter() - start
        return out

    TensorParallel.all_reduce = timed
    cfg = EngineConfig(args.model_path, dtype=args.dtype, block_size=16, max_batch_size=max(args.batch),
                       max_input_length=args.context, max_output_length=args.steps + 4, progress=False)  # fmt: skip
    engine = LLMEngine(cfg)
    engine.warmup()
    result = {}
    for batch in args.batch:
        prompts = random_prompts(batch, args.context, engine.model_config.vocab_size)
        params = SamplingParams(max_tokens=args.steps + 3, ignore_eos=True)
        seqs = [engine.add_request(p, params) for p in prompts]
        start = time.perf_counter()
        while not all(s.output_token_ids for s in seqs):
            engine.step()
        first = time.perf_counter() - start
        while any(len(s.output_token_ids) < 3 for s in seqs):
            engine.step()
        spent[0], start = 0.0, time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        step = (time.perf_counter() - start) / args.steps
        result[batch] = {"first": first, "step": step, "allreduce": spent[0] / args.steps / step}
        while engine.has_unfinished():
            engine.step()
    kv, weights = engine.cache_manager.total_bytes, resident_bytes(engine.model)
    Path(f"{args.out_json}.rank{engine.tp.rank}").write_text(json.dumps({"runs": result, "weights": weights, "kv": kv}))
    leave_tensor_parallel()


def measured(args) -> list[dict]:
    rows = []
    for world in (1, 2):
        out = Path(f"/tmp/atb_llm_bench_tp_{world}.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "-m",
               "benchmarks.bench_tp", "--worker", "--out_json", str(out), "--model_path", args.model_path,
               "--context", str(args.context), "--steps", str(args.steps),
               "--batch", *map(str, args.batch)]  # fmt: skip
        cmd += ["--dtype", args.dtype] if args.dtype else []
        threads = str(2 // world)  # the two cores: two threads for one rank, one each for two
        subprocess.run(cmd, check=True, env=os.environ | {"OMP_NUM_THREADS": threads})
        ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(world)]
        for batch, run in ranks[0]["runs"].items():
            rows.append({
                "world size": world, "threads / rank": threads, "batch": batch,
                f"first token @{args.context} (s)": f"{run['first']:.2f}",
                "decode step (ms)": f"{run['step'] * 1e3:.1f}",
                "all-reduce share": f"{run['allreduce']:.0%}" if world > 1 else "-",
                "weights / rank (MiB)": f"{max(r['weights'] for r in ranks) / 2**20:.0f}",
                "KV / rank (MiB)": f"{max(r['kv'] for r in ranks) / 2**20:.0f}",
            })  # fmt: skip
    return rows


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model_path", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--paper", action="store_true", help="only the per-rank table from the configs")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out_json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return ""
    text = "## Per rank, from the configs (bf16, 8K tokens of context, batch 1)\n\n"
    paper = paper_rows()
    text += markdown_table(paper, list(paper[0])) + "\n"
    if not args.paper:
        from atb_llm.utils.default_model import resolve_model_path

        args.model_path = str(resolve_model_path(args.model_path))
        rows = measured(args)
        text = (f"## Measured: {Path(args.model_path).name}, CPU: {cpu_name()}, gloo\n\n"
                + markdown_table(rows, list(rows[0])) + "\n\n" + text)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tensor_parallel.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
