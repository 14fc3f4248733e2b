"""Command line: parse MindIE's arguments, then run the performance cases or a dataset."""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile

import torch.distributed as dist

from modeltest.args import CODE_TESTS, PERF_TESTS, build_parser, parse_args


def main(argv: list[str] | None = None) -> list[dict]:
    """Argument errors exit with the usage; missing data or a bad dataset file exits with the reason."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
    except ValueError as e:
        build_parser().error(str(e))
    if args.world_size > 1:  # the chip count: really that many ranks, under torchrun
        from atb_llm.utils.distributed import init_tensor_parallel, launch_ranks

        launch_ranks(args.world_size, "modeltest", argv)
        init_tensor_parallel(args.device if args.device != "auto" else "cpu")
        if dist.get_rank():  # rank 0 prints and writes; the others compute their shares
            args = dataclasses.replace(args, out=tempfile.mkdtemp(prefix="modeltest-rank"))
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    if args.test in PERF_TESTS:
        from modeltest.performance import run_performance as run
    elif args.test in CODE_TESTS:
        from modeltest.humaneval import run_humaneval as run
    else:
        from modeltest.precision import run_precision as run
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    finally:
        if args.world_size > 1:
            from atb_llm.utils.distributed import leave_tensor_parallel

            leave_tensor_parallel()
