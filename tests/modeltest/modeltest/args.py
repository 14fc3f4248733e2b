"""MindIE's run.sh arguments, positional as there, plus a few flags:

    pa_{bf16|fp16|fp32} performance CASE_PAIRS BATCH MODEL [WEIGHT_DIR] [WORLD_SIZE] [MAX_POSITION_EMBEDDING]
    pa_{bf16|fp16|fp32} performance_maxbs CASE_PAIRS MODEL [WEIGHT_DIR] [WORLD_SIZE] [MAX_POSITION_EMBEDDING]
    pa_{bf16|fp16|fp32} full_BoolQ BATCH MODEL [WEIGHT_DIR] [WORLD_SIZE]
    pa_{bf16|fp16|fp32} full_MMLU|full_CEval SHOTS BATCH MODEL [WEIGHT_DIR] [WORLD_SIZE]
    pa_{bf16|fp16|fp32} full_HumanEval|full_HumanEval_X BATCH MODEL [WEIGHT_DIR] [WORLD_SIZE]

CASE_PAIRS: [[input_length,output_length],...], e.g. [[2048,2048],[1024,1024]] (no spaces).
performance_maxbs runs each case pair at the largest batch whose sequences all fit the KV cache
(--cache_memory_gb, default: half the device's free memory; at most --max_batch).
BATCH: 1 or [1]; several for every case pair: 1,8 or [1,8]; one list per case pair:
[[1,4],[1,8]]. WEIGHT_DIR: a Hugging Face folder; omitted or `default`: the default model.
WORLD_SIZE: cards; only 1.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from modeltest.datasets import DATASETS

RESULTS = Path(__file__).resolve().parents[1] / "results"
CODE_TESTS = ("full_HumanEval", "full_HumanEval_X")  # generated and executed, not scored by options
PERF_TESTS = ("performance", "performance_maxbs")
MODES = re.compile(r"^pa_(bf16|fp16|fp32)$")
MODEL_NAME = re.compile(r"^[A-Za-z][\w.-]*$")


@dataclass(frozen=True)
class PerfCase:
    input_length: int
    output_length: int
    batch_sizes: tuple[int, ...]


@dataclass(frozen=True)
class RunArgs:
    mode: str  # "pa"
    dtype: str  # bf16 / fp16 / fp32
    test: str  # "performance", "performance_maxbs" or a key of DATASETS
    model_name: str
    weight_dir: str | None  # None: the default model
    world_size: int = 1
    max_position_embedding: int | None = None  # performance: the longest in + out a case may need
    shots: int = 0
    batch_sizes: tuple[int, ...] = (1,)  # datasets: one run per batch size
    cases: tuple[PerfCase, ...] = ()  # performance
    limit: int | None = None
    mlgc: str = "off"
    compare: str | None = None
    out: Path = RESULTS
    data: Path | None = None
    device: str = "auto"
    tie_margin: float = 1e-3
    style: str = "auto"  # HumanEval prompts: completion | chat | auto (chat when the tokenizer has a template)
    max_new_tokens: int = 512  # HumanEval
    exec_timeout: float = 10.0  # HumanEval: seconds per program
    cache_memory_gb: float | None = None  # performance_maxbs: the KV cache budget (None: from the device)
    max_batch: int = 256  # performance_maxbs: the largest batch tried
    variants: tuple[str, ...] = ()  # datasets and HumanEval: more WEIGHT_DIR[@MLGC] runs, compared with the first
    adapter: str | None = None  # datasets and HumanEval: score this LoRA adapter instead of the base model
    lora_modules: tuple[str, ...] = ()  # NAME=PATH adapters beside the weight folder's lora_adapter.json


def _json_list(text: str, what: str, example: str):
    try:
        return json.loads(text if text.startswith("[") else f"[{text}]")
    except json.JSONDecodeError:
        raise ValueError(f"{what} {text!r} is malformed; write it like {example} (no spaces)") from None


def _positive(values, what: str, text: str, example: str) -> tuple[int, ...]:
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"{what} {text!r} must hold positive integers, like {example}")
    return tuple(values)


def parse_case_pairs(text: str) -> list[tuple[int, int]]:
    example = "[[2048,2048],[1024,1024]]"
    pairs = _json_list(text, "case pair list", example)
    if not text.startswith("[[") or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise ValueError(f"case pair list {text!r} must be [input_length,output_length] pairs, like {example}")
    return [_positive(p, "case pair", text, example) for p in pairs]


def parse_batch_sizes(text: str, num_cases: int = 1) -> list[tuple[int, ...]]:
    """One tuple of batch sizes per case pair."""
    example = "1, 1,8, [1,8] or [[1,4],[1,8]]"
    value = _json_list(text, "batch size", example)
    if value and all(isinstance(v, list) for v in value):
        if len(value) != num_cases:
            raise ValueError(f"batch size {text!r} has {len(value)} lists but there are {num_cases} case pairs")
        return [_positive(v, "batch size", text, example) for v in value]
    return [_positive(value, "batch size", text, example)] * num_cases


def _tail(words: list[str]) -> tuple[str | None, int]:
    """[WEIGHT_DIR] [WORLD_SIZE] -> (weight_dir or None, world_size)."""
    if len(words) > 2:
        raise ValueError(f"unexpected argument(s) {words[2:]} after the weight folder and the world size")
    weight, world = None, "1"
    if len(words) == 2:
        weight, world = words
    elif words and words[0].isdigit() and not Path(words[0]).is_dir():
        world = words[0]
    elif words:
        weight = words[0]
    if not world.isdigit() or int(world) < 1:
        raise ValueError(f"world size {world!r} must be a number of cards, e.g. 1 or 2")
    return (None if weight in (None, "", "default") else weight), int(world)


def parse_words(words: list[str]) -> dict:
    """The positional part of the command line -> RunArgs fields."""
    if len(words) < 2:
        raise ValueError("expected at least MODE TEST, e.g. `pa_bf16 full_BoolQ 1 qwen2_mlgc`")
    mode, test, rest = words[0], words[1], words[2:]
    if not MODES.match(mode):
        raise ValueError(f"mode {mode!r} is not supported; use pa_bf16, pa_fp16 or pa_fp32")
    fields = dict(mode="pa", dtype=mode.split("_")[1], test=test)
    if test == "performance":
        head, usage = 2, "performance CASE_PAIRS BATCH MODEL"
    elif test == "performance_maxbs":
        head, usage = 1, "performance_maxbs CASE_PAIRS MODEL"
    elif test in CODE_TESTS:
        head, usage = 1, f"{test} BATCH MODEL"
    elif test in DATASETS:
        shots = DATASETS[test].takes_shots
        head, usage = (2, f"{test} SHOTS BATCH MODEL") if shots else (1, f"{test} BATCH MODEL")
    else:
        raise ValueError(f"unknown test {test!r}; choose one of {', '.join((*PERF_TESTS, *DATASETS, *CODE_TESTS))}")
    if len(rest) <= head or not MODEL_NAME.match(rest[head]):
        raise ValueError(f"expected `{usage} [WEIGHT_DIR] [WORLD_SIZE]`, got {' '.join(words[1:])!r}")
    fields["model_name"] = rest[head]
    tail = rest[head + 1 :]
    if test in PERF_TESTS and len(tail) == 3:  # MindIE's trailing max_position_embedding / max_sequence_length
        if not tail[2].isdigit() or int(tail[2]) < 1:
            raise ValueError(f"max_position_embedding {tail[2]!r} must be a positive number of tokens, e.g. 4096")
        fields["max_position_embedding"] = int(tail.pop())
    fields["weight_dir"], fields["world_size"] = _tail(tail)
    if test in PERF_TESTS:
        pairs = parse_case_pairs(rest[0])
        batches = parse_batch_sizes(rest[1], len(pairs)) if test == "performance" else [()] * len(pairs)
        fields["cases"] = tuple(PerfCase(i, o, b) for (i, o), b in zip(pairs, batches))
        limit = fields.get("max_position_embedding")
        for i, o in pairs:
            if limit and i + o > limit:
                raise ValueError(f"case [{i},{o}] needs {i + o} positions, more than max_position_embedding={limit}")
    else:
        if head == 2 and test not in CODE_TESTS:
            if not rest[0].isdigit():
                raise ValueError(f"shots {rest[0]!r} must be a whole number, e.g. 5 (or 0)")
            fields["shots"] = int(rest[0])
        fields["batch_sizes"] = parse_batch_sizes(rest[head - 1])[0]
    return fields


def parse_variant(spec: str) -> tuple[str | None, str]:
    """`WEIGHT_DIR[@MLGC]` -> (weight_dir or None for `default`, mlgc)."""
    weight, _, mlgc = spec.partition("@")
    if not weight:
        raise ValueError(f"--variant {spec!r} names no weight folder; write WEIGHT_DIR[@MLGC], e.g. default@streaming")
    if weight != "default" and not Path(weight).is_dir():
        raise ValueError(f"--variant {spec!r}: {weight!r} is not a folder; give a weight folder or `default`")
    return (None if weight == "default" else weight), (mlgc or "off")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bash tests/modeltest/run.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("words", nargs="*", metavar="ARG", help="the positional arguments above")
    ap.add_argument("--limit", type=int, default=None, help="datasets: only the first N items (subjects interleaved)")
    ap.add_argument("--mlgc", default="off", help="KV cache: off | auto | PLAN.json | streaming | random")
    ap.add_argument(
        "--compare",
        choices=["hf", "lm_eval"],
        default=None,
        help="also score with Hugging Face transformers, or with lm-eval's client against the engine's server",
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results root (default {RESULTS})")
    ap.add_argument("--data", type=Path, default=None, help="dataset folder (C-Eval: the folder with dev/ and val/)")
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available)")
    ap.add_argument("--tie-margin", type=float, default=1e-3, help="option log-prob gap counted as a tie")
    ap.add_argument("--style", default="auto", choices=["auto", "completion", "chat"], help="HumanEval prompts")
    ap.add_argument("--max_new_tokens", type=int, default=512, help="HumanEval: tokens per answer")
    ap.add_argument("--exec_timeout", type=float, default=10.0, help="HumanEval: seconds per program")
    ap.add_argument("--cache_memory_gb", type=float, default=None, help="performance_maxbs: KV cache budget")
    ap.add_argument("--max_batch", type=int, default=256, help="performance_maxbs: the largest batch tried")
    ap.add_argument(
        "--variant",
        dest="variants",
        action="append",
        default=[],
        metavar="WEIGHT_DIR[@MLGC]",
        help="datasets and HumanEval: also run these weights (`default`: the default model) with this KV cache "
        "(default off), and compare every variant with the first (repeatable)",
    )
    ap.add_argument("--adapter", default=None, help="datasets and HumanEval: score this LoRA adapter (by name)")
    ap.add_argument(
        "--lora_modules", nargs="+", default=[], metavar="NAME=PATH", help="LoRA adapters (PEFT folders) to load"
    )
    return ap


def parse_args(argv: list[str] | None = None) -> RunArgs:
    """Raises ValueError naming what was wrong."""
    ns = build_parser().parse_intermixed_args(argv)
    fields = parse_words(ns.words)
    if ns.limit is not None and ns.limit < 1:
        raise ValueError(f"--limit {ns.limit} must be at least 1")
    if ns.limit is not None and fields["test"] in PERF_TESTS:
        raise ValueError("--limit applies to datasets, not to performance")
    if ns.max_batch < 1 or (ns.cache_memory_gb is not None and ns.cache_memory_gb <= 0):
        raise ValueError(f"--max_batch {ns.max_batch} and --cache_memory_gb {ns.cache_memory_gb} must be positive")
    if ns.tie_margin < 0:
        raise ValueError(f"--tie-margin {ns.tie_margin} must be >= 0")
    if ns.variants and fields["test"] in PERF_TESTS:
        raise ValueError("--variant applies to datasets and HumanEval, not to performance; run one command per variant")
    flags = {k: v for k, v in vars(ns).items() if k != "words"}
    flags["variants"] = tuple(ns.variants)
    flags["lora_modules"] = tuple(ns.lora_modules)
    if ns.adapter is not None and fields["test"] in PERF_TESTS:
        raise ValueError("--adapter applies to datasets and HumanEval, not to performance")
    if fields["world_size"] > 1 and ns.compare:
        raise ValueError(f"--compare runs at world size 1; drop it to run {fields['world_size']} ranks")
    if ns.adapter is not None and ns.compare == "lm_eval":
        raise ValueError("--adapter with --compare lm_eval is not supported; compare an adapter with --compare hf")
    for spec in ns.variants:
        parse_variant(spec)
    return RunArgs(**fields, **flags)
