"""Performance: every case pair at each of its batch sizes on the engine (and on transformers
with --compare hf), timed by benchmarks.common: first token ms (the batch's prefill), mean
non-first token ms, end-to-end tokens/s, peak memory and KV cache size. Written as CSV and a
Markdown table, and, where a case ran at several batch sizes, a plot of tokens/s against batch
size.

performance_maxbs: each case pair at the largest batch whose sequences (input + output tokens
each) all fit the KV cache of --cache_memory_gb (default: half of the device's free memory after
twice the weight files), at most --max_batch; with an MLGC plan more sequences fit the same bytes.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from tqdm import tqdm

from atb_llm.config import parse_dtype
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.utils.default_model import resolve_model_path
from benchmarks.common import load_hf, markdown_table, measure_engine, measure_hf
from modeltest import report
from modeltest.args import RunArgs

# CSV column -> Markdown header (the seeds' columns, then memory and the ratio to transformers)
COLUMNS = {
    "batch_size": "batch_size",
    "input_length": "input length",
    "output_length": "output length",
    "engine": "engine",
    "first_token_ms": "first token (ms)",
    "non_first_token_ms": "non-first token mean (ms)",
    "e2e_tokens_per_s": "E2E throughput (tokens/s)",
    "response_time_ms": "ResponseTime (ms)",
    "peak_memory_gb": "peak memory (GiB)",
    "kv_cache_bytes": "KV cache (MiB)",
    "e2e_vs_hf": "E2E vs transformers",
}


def table_row(row: dict) -> dict:
    """A PerfResult row with the model zoo's ResponseTime (E2E throughput = batch_size * output_length
    / ResponseTime) and kv_cache_gb as whole bytes (engine rows; transformers' cache is not measured)."""
    gb = row.pop("kv_cache_gb")
    row["response_time_ms"] = 1000 * row["batch_size"] * row["output_length"] / row["e2e_tokens_per_s"]
    return dict(row, kv_cache_bytes=round(gb * 2**30)) if row["engine"] == "atb_llm" else row


def markdown_rows(rows: list[dict], columns: list[str]) -> list[dict]:
    def cell(row: dict, c: str):
        value = row.get(c, "")
        return value / 2**20 if c == "kv_cache_bytes" and value != "" else value

    return [{COLUMNS[c]: cell(r, c) for c in columns} for r in rows]


def cache_budget_gb(args: RunArgs, model_path: str, device: str) -> float:
    """--cache_memory_gb, or half of what the device has free once the weights (counted twice:
    loading converts them) are taken."""
    if args.cache_memory_gb is not None:
        return args.cache_memory_gb
    weights = sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors"))
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free = int(meminfo["MemAvailable"].split()[0]) * 1024
    return max(0.01, (free - 2 * weights) / 2 / 2**30)


def max_batch(engine: LLMEngine, num_tokens: int, cap: int) -> int:
    """The most sequences of `num_tokens` tokens the engine's pools hold at once, at most `cap`."""
    need = engine.cache_manager.blocks_for(num_tokens)
    fit = min(engine.cache_manager.num_blocks[p] // n for p, n in need.items() if n)
    if fit < 1:
        raise ValueError(f"not one sequence of {num_tokens} tokens fits the KV cache; give --cache_memory_gb more")
    return min(fit, cap)


def runs_of(args: RunArgs) -> list[tuple[int, int, int]]:
    """(batch, input length, output length) in command-line order: case pairs, then batch sizes."""
    return [(b, c.input_length, c.output_length) for c in args.cases for b in c.batch_sizes]


def engine_for(
    args: RunArgs, model_path: str, device: str, runs: list[tuple[int, int, int]], cache_gb: float | None = None
) -> LLMEngine:
    """One engine sized for the largest batch, input and output of all runs (its cache: `cache_gb`,
    else enough for that batch)."""
    max_b, max_in, max_out = (max(r[k] for r in runs) for k in range(3))
    cfg = EngineConfig(
        model_path,
        dtype=args.dtype,
        device=device,
        max_batch_size=max_b,
        max_input_length=max_in,
        max_output_length=max_out,
        max_prefill_tokens=min(max_b * max_in, max(max_in, 16384)),
        cache_memory_gb=cache_gb,
        mlgc=args.mlgc,
        progress=False,
    )
    return LLMEngine(cfg)


def plot_throughput(rows: list[dict], path: Path) -> Path | None:
    """tokens/s against batch size, a line per engine and case pair; None when no case pair ran
    at more than one batch size."""
    series: dict[tuple, list[tuple[int, float]]] = {}
    for r in rows:
        key = (r["engine"], r["input_length"], r["output_length"])
        series.setdefault(key, []).append((r["batch_size"], r["e2e_tokens_per_s"]))
    if max(len(points) for points in series.values()) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {case: f"C{n}" for n, case in enumerate(sorted({k[1:] for k in series}))}
    for (engine, i, o), points in sorted(series.items()):
        points.sort()
        style = "-" if engine == "atb_llm" else "--"
        ax.plot(*zip(*points), style, marker="o", color=colors[i, o], label=f"{engine} {i}/{o}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["batch_size"] for r in rows}), [str(b) for b in sorted({r["batch_size"] for r in rows})])
    ax.set_xlabel("batch size")
    ax.set_ylabel("E2E throughput (tokens/s)")
    ax.set_title("throughput by batch size (input/output length)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def file_stem(args: RunArgs) -> str:
    cases = "_".join(f"{c.input_length}x{c.output_length}" for c in args.cases)
    batches = "-".join(str(b) for b in sorted({b for c in args.cases for b in c.batch_sizes})) or "max"
    return f"{args.test}_{cases}_batch{batches}_tp{args.world_size}_mlgc-{report.mlgc_tag(args.mlgc)}"


def write(args: RunArgs, device: str, rows: list[dict]) -> str:
    out = report.results_dir(args, "performance", device)
    stem = file_stem(args)
    report.write_csv(out / f"{stem}_result.csv", rows, list(COLUMNS))
    present = [c for c in COLUMNS if any(c in r for r in rows)]
    table = markdown_table(markdown_rows(rows, present), [COLUMNS[c] for c in present])
    (out / f"{stem}_result.md").write_text(table + "\n", encoding="utf-8")
    plot = plot_throughput(rows, out / f"{stem}_throughput.png")
    print(f"\n{table}\n\nresults: {out}/{stem}_*" + (f" (plot {plot.name})" if plot else ""))
    return table


def run_performance(args: RunArgs) -> list[dict]:
    model_path = str(resolve_model_path(args.weight_dir))
    device = report.resolve_device(args.device)
    runs, cache_gb = runs_of(args), None
    if args.test == "performance_maxbs":  # size the cache first, then find each case's batch in it
        cache_gb = cache_budget_gb(args, model_path, device)
        cap = [(args.max_batch, c.input_length, c.output_length) for c in args.cases]
        engine = engine_for(args, model_path, device, cap, cache_gb)
        runs = [(max_batch(engine, i + o, args.max_batch), i, o) for _, i, o in cap]
        print(f"KV cache {cache_gb:.2f} GiB: batch {', '.join(f'{b} at [{i},{o}]' for b, i, o in runs)}")
    else:
        engine = engine_for(args, model_path, device, runs)
    engine.warmup()
    rows = [table_row(measure_engine(engine, *run).row()) for run in tqdm(runs, desc="performance atb_llm")]
    del engine
    gc.collect()
    if args.compare == "hf":
        model = load_hf(model_path, parse_dtype(args.dtype)).to(device)
        hf = [table_row(measure_hf(model, *run).row()) for run in tqdm(runs, desc="performance transformers")]
        for row, ref in zip(rows, hf):
            row["e2e_vs_hf"] = row["e2e_tokens_per_s"] / ref["e2e_tokens_per_s"]
        rows += hf
    write(args, device, rows)
    return rows
