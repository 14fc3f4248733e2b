"""KV memory of MLGC plans against the full cache, counted in the whole blocks the engine allocates.

    python -m benchmarks.bench_memory [--out DIR]

For the default model (its calibrated plans when WEIGHT_DIR holds them, else the same budget on
random groups) and for the Qwen2.5-7B shapes (28 layers x 4 KV heads; the memory depends only on
how many groups stay full): KV bytes per sequence at 4K-32K tokens and how many sequences fit a
fixed cache budget. Writes memory.md and memory.png.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from atb_llm.compression.layout import GroupLayout
from atb_llm.compression.memory import kv_bytes, kv_bytes_by_level
from atb_llm.compression.plan import baseline_plan
from atb_llm.models.qwen2_mlgc.config_qwen2_mlgc import load_qwen2_config
from benchmarks.common import CONFIGS, markdown_table

HERE = Path(__file__).parent
CONTEXTS = (4096, 8192, 16384, 32768)
MODELS = {  # name -> (config folder, cache budget for the "sequences that fit" column)
    "Qwen2.5-Coder-0.5B-Instruct (default)": ("qwen2.5-0.5b-instruct", 4 * 2**30),
    "Qwen2.5-7B-Instruct (shapes)": ("qwen2.5-7b-instruct", 16 * 2**30),
}


def config_of(name: str):
    """The shipped config of `name`, read the way a weight folder's config.json is."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text((CONFIGS / f"{name}.json").read_text())
        return load_qwen2_config(tmp)


def layouts(config, block_size: int, sink: int, recent: int) -> dict[str, GroupLayout]:
    out = {"full cache": GroupLayout.uniform(config.num_hidden_layers, config.num_key_value_heads)}
    for ratio in (0.25, 0.5):
        for int8 in (False, True):
            plan = baseline_plan("random", config, block_size, sink, recent, full_ratio=ratio, int8=int8)
            out[f"MLGC {ratio}{' int8' if int8 else ''}"] = plan.to_layout()
    out["streaming"] = baseline_plan("streaming", config, block_size, sink, recent).to_layout()
    return out


def rows_for(model: str, config, budget: int, block_size: int, sink: int, recent: int) -> list[dict]:
    dtype, rows = torch.bfloat16, []
    lays = layouts(config, block_size, sink, recent)
    for name, layout in lays.items():
        row = {"model": model, "cache": name}
        for n in CONTEXTS:
            b = kv_bytes(layout, n, config.head_dim, dtype, block_size)
            full = kv_bytes(lays["full cache"], n, config.head_dim, dtype, block_size)
            row[f"{n // 1024}K MiB"] = f"{b / 2**20:.0f} ({b / full:.1%})"
            row[f"{n // 1024}K seqs"] = budget // b
        rows.append(row)
    return rows


def plot(per_level: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = list(per_level)
    bottom = [0.0] * len(names)
    for level in ("full", "full_int8", "window", "window_int8"):
        vals = [per_level[n].get(level, 0.0) for n in names]
        if any(vals):
            ax.barh(names, vals, left=bottom, label=level)
            bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("KV cache per 32K-token sequence (GiB), Qwen2.5-7B shapes, bf16")
    ax.legend(loc="lower right")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block_size", type=int, default=128)
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--recent", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, per_level = [], {}
    for model, (name, budget) in MODELS.items():
        config = config_of(name)
        rows += rows_for(model, config, budget, args.block_size, args.sink, args.recent)
        if "7B" in model:
            for cache, layout in layouts(config, args.block_size, args.sink, args.recent).items():
                by = kv_bytes_by_level(layout, 32768, config.head_dim, torch.bfloat16, args.block_size)
                per_level[cache] = {k: v / 2**30 for k, v in by.items()}
    columns = ["model", "cache"] + [f"{n // 1024}K {c}" for n in CONTEXTS for c in ("MiB", "seqs")]
    table = markdown_table(rows, columns)
    text = (
        f"KV cache per sequence (MiB, share of the full cache) and sequences that fit a cache budget of 4 GiB "
        f"(0.5B) / 16 GiB (7B); bf16, block_size={args.block_size}, sink={args.sink}, recent={args.recent} "
        f"(aligned to whole blocks)\n\n{table}\n"
    )
    (args.out / "memory.md").write_text(text)
    plot(per_level, args.out / "memory.png")
    print(text)
    return text


if __name__ == "__main__":
    main()
