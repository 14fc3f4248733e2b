"""Make an MLGC plan for a model: which level each group keeps its history at.

    bash examples/models/qwen2_5_mlgc/calibrate.sh -m WEIGHT_DIR [--kv_budget 0.25] [--float_levels]
        [--sink 64] [--recent 1024] [--block_size 128] [--reference_tokens 32768] [-o PLAN]
    bash examples/models/qwen2_5_mlgc/calibrate.sh -m WEIGHT_DIR --full_ratio 0.25 [--int8]
    bash examples/models/qwen2_5_mlgc/calibrate.sh -m WEIGHT_DIR --world_size 2   (razor, tensor parallel)
    bash examples/models/qwen2_5_mlgc/calibrate.sh -m WEIGHT_DIR --method loss [--kv_budget 0.25]
        [--calib_text FILE] [--samples 4] [--context 2048] [--continuation 64]

razor (default) scores groups by RazorAttention's echo and induction probes. By default it spends
--kv_budget (0.25) of the full cache's KV bytes at --reference_tokens over every level (full,
full_int8, window, window_int8; --float_levels: full and window), keeping as many groups' whole
history as the bytes hold, int8 where it must, and windowing those of least score; with
--full_ratio it keeps that share of the groups full and windows the rest, as RazorAttention does.
loss measures what every level costs every group (the loss of a teacher-forced continuation of
natural text with that group alone at that level) and spends the budget where it costs least.

--world_size N probes on N tensor-parallel ranks (started under torchrun; each rank its own heads)
and writes the same plan as one process does; a plan runs at any world size that divides the KV heads.

Writes WEIGHT_DIR/mlgc_plan.json by default (what `--mlgc auto` loads), prints the plan as a
layer x group grid and the KV bytes per token it leads to.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from atb_llm.compression.memory import kv_bytes
from atb_llm.compression.plan import PLAN_NAME, MlgcPlan, baseline_plan, describe
from atb_llm.config import parse_dtype
from atb_llm.models.base.router import get_router
from atb_llm.runtime.calibration import CalibrationConfig, calibrate
from atb_llm.runtime.engine import LLMEngine
from atb_llm.runtime.engine_config import EngineConfig
from atb_llm.runtime.level_costs import LossCalibrationConfig, loss_plan
from atb_llm.utils.cli import run_main
from atb_llm.utils.default_model import resolve_model_path
from atb_llm.utils.distributed import init_tensor_parallel, is_main_rank, launch_ranks, leave_tensor_parallel

CALIB_TEXT = Path("/usr/share/common-licenses/GPL-3")  # natural English text on every Debian machine


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--full_ratio", type=float, default=None, help="keep this share of the groups full, window the rest"
    )
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--recent", type=int, default=1024, help="recent window (extended to fill its last block)")
    ap.add_argument("--int8", action="store_true", help="--full_ratio: both levels int8 (full_int8, window_int8)")
    ap.add_argument("--float_levels", action="store_true", help="--kv_budget: only full and window, no int8 levels")
    ap.add_argument(
        "--method",
        default="razor",
        choices=["razor", "loss", "streaming", "random"],
        help="razor: retrieval-head scores (default); loss: measured cost under --kv_budget; streaming / random",
    )
    ap.add_argument(
        "--kv_budget", type=float, default=None, help="KV bytes to spend, a share of the full cache's (default 0.25)"
    )
    ap.add_argument("--reference_tokens", type=int, default=32768, help="the length --kv_budget counts bytes at")
    ap.add_argument("--calib_text", type=Path, default=CALIB_TEXT, help="loss: natural text the prompts are cut from")
    ap.add_argument("--context", type=int, default=2048, help="loss: tokens prefilled per prompt")
    ap.add_argument("--continuation", type=int, default=64, help="loss: tokens teacher-forced per prompt")
    ap.add_argument("--samples", type=int, default=4, help="razor: random probe sequences; loss: text prompts")
    ap.add_argument("--period", type=int, default=256, help="probe length before it repeats")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world_size", type=int, default=1, help="razor: probe on N tensor-parallel ranks (torchrun)")
    ap.add_argument("-o", "--output", default=None, help=f"plan path (default: WEIGHT_DIR/{PLAN_NAME})")
    EngineConfig.add_cli_args(ap)  # the model, its dtype and device, the block size the plan aligns to
    return ap.parse_args(argv)


def loss_calibrate(args: argparse.Namespace, model: Path) -> MlgcPlan:
    """--method loss: prompts cut from --calib_text, one engine, every (group, level) measured."""
    cfg = EngineConfig.from_cli_args(
        args,
        model_path=str(model),
        max_batch_size=args.samples,
        max_input_length=args.context,
        max_output_length=args.continuation,
        mlgc="off",
    )
    engine = LLMEngine(cfg)
    if not args.calib_text.is_file():
        raise FileNotFoundError(f"--calib_text {args.calib_text} does not exist; give a text file to calibrate on")
    ids = engine.tokenizer.encode(args.calib_text.read_text(), add_special_tokens=False)
    n = args.context + args.continuation
    prompts = [ids[i : i + n] for i in range(0, len(ids) - n + 1, n)][: args.samples]
    if len(prompts) < args.samples:
        raise ValueError(
            f"{args.calib_text} gives {len(prompts)} prompt(s) of {n} tokens, --samples asks {args.samples}; "
            "give a longer text or lower --samples / --context"
        )
    lc = LossCalibrationConfig(
        0.25 if args.kv_budget is None else args.kv_budget, args.reference_tokens,
        args.sink, args.recent, args.block_size,
        ("full", "window") if args.float_levels else ("full", "full_int8", "window", "window_int8"),
        args.context, args.continuation, extra={"text": args.calib_text.name, "seed": args.seed},
    )  # fmt: skip
    return loss_plan(engine, prompts, lc)


def main(argv=None) -> Path | None:
    """The plan's path (None on the ranks other than 0, which write nothing)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    model = resolve_model_path(args.model_path)
    config = get_router(model).get_config()
    if args.full_ratio is not None and args.kv_budget is not None:
        raise ValueError("give --full_ratio (a share of the groups) or --kv_budget (a share of the bytes), not both")
    if args.world_size > 1 and args.method != "razor":
        raise ValueError(f"--world_size {args.world_size} probes with --method razor only; run --method "
                         f"{args.method} at --world_size 1 (its plan runs at any world size)")  # fmt: skip
    launch_ranks(args.world_size, "atb_llm.entrypoints.calibrate", argv)
    args.device = init_tensor_parallel(args.device)
    if args.method == "loss":
        plan = loss_calibrate(args, model)
    elif args.method == "razor":  # by default: a quarter of the bytes, spent over every level
        budget = None if args.full_ratio is not None else 0.25 if args.kv_budget is None else args.kv_budget
        int8 = args.int8 if budget is None else not args.float_levels
        cfg = CalibrationConfig(
            args.full_ratio or 0.25, budget, args.reference_tokens, args.sink, args.recent, int8,
            args.block_size, args.samples, args.period, seed=args.seed,
        )  # fmt: skip
        plan = calibrate(str(model), cfg, dtype=args.dtype, device=args.device)
    else:
        ratio = 0.25 if args.full_ratio is None else args.full_ratio
        plan = baseline_plan(args.method, config, args.block_size, args.sink, args.recent, ratio, args.int8, args.seed)
    main_rank = is_main_rank()
    leave_tensor_parallel()  # the probes are done; rank 0 alone writes
    if not main_rank:
        return None
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
