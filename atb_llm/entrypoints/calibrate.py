"""Make an MLGC plan for a model: which groups keep their whole history.

    bash examples/models/qwen2_5_mlgc/calibrate.sh -m WEIGHT_DIR [--full_ratio 0.25] [--sink 64]
        [--recent 1024] [--int8] [--block_size 128] [-o PLAN]

Writes WEIGHT_DIR/mlgc_plan.json by default (what `--mlgc auto` loads), prints the plan as a
layer x group grid and the KV bytes per token it leads to.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from atb_llm.compression.memory import kv_bytes
from atb_llm.compression.plan import PLAN_NAME, baseline_plan, describe
from atb_llm.config import parse_dtype
from atb_llm.models.base.router import get_router
from atb_llm.runtime.calibration import CalibrationConfig, calibrate
from atb_llm.runtime.engine_config import EngineConfig
from atb_llm.utils.cli import run_main
from atb_llm.utils.default_model import resolve_model_path


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full_ratio", type=float, default=0.25, help="fraction of groups kept full")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--recent", type=int, default=1024, help="recent window (extended to fill its last block)")
    ap.add_argument("--int8", action="store_true", help="int8 variants: full_int8 and window_int8")
    ap.add_argument(
        "--method",
        default="razor",
        choices=["razor", "streaming", "random"],
        help="razor: calibrated (default); streaming / random: baselines",
    )
    ap.add_argument("--samples", type=int, default=4, help="random probe sequences")
    ap.add_argument("--period", type=int, default=256, help="probe length before it repeats")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", default=None, help=f"plan path (default: WEIGHT_DIR/{PLAN_NAME})")
    EngineConfig.add_cli_args(ap)  # the model, its dtype and device, the block size the plan aligns to
    return ap.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    model = resolve_model_path(args.model_path)
    config = get_router(model).get_config()
    if args.method == "razor":
        cfg = CalibrationConfig(
            args.full_ratio,
            args.sink,
            args.recent,
            args.int8,
            args.block_size,
            args.samples,
            args.period,
            seed=args.seed,
        )
        plan = calibrate(str(model), cfg, dtype=args.dtype, device=args.device)
    else:
        plan = baseline_plan(
            args.method, config, args.block_size, args.sink, args.recent, args.full_ratio, args.int8, args.seed
        )
    out = plan.save(args.output or Path(model) / PLAN_NAME)
    layout = plan.to_layout()
    print(describe(layout))
    print(f"levels: {plan.counts()}  (F full, W window, f full_int8, w window_int8)")
    dtype = parse_dtype(args.dtype or config.dtype)
    full = kv_bytes(
        type(layout).uniform(config.num_hidden_layers, config.num_key_value_heads), 1, config.head_dim, dtype, 1
    )
    for n in (4096, 8192, 32768):
        b = kv_bytes(layout, n, config.head_dim, dtype, args.block_size)
        print(f"KV bytes per token at {n:>5} tokens: {b / n:9.0f}  ({b / n / full:.1%} of the full cache's {full})")
    print(f"plan written to {out}")
    return out


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_main(main, "calibrate")
