"""Calibration by measured loss: what each level costs each group, and the plan that spends a KV
byte budget where it costs least.

For every group g and every level L it may take, the group alone is kept at L (every other group
full) and long calibration prompts are run through the engine: a context prefilled, then a
continuation teacher-forced through decode, where the levels act (prefill attends over the whole
prompt for every head, so the contexts are prefilled once and replayed under every layout). The
cost of (g, L) is the mean increase of the continuation's negative log-likelihood over the full
cache. Then every group gets the level that minimises the summed cost
with the plan's KV bytes (at a reference length) within the budget: a knapsack over the levels
(atb_llm.compression.budget). One loaded model serves every layout (LLMEngine.set_layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from tqdm import tqdm

from atb_llm.compression.budget import spend
from atb_llm.compression.layout import GroupLayout
from atb_llm.compression.levels import Level, make_level
from atb_llm.compression.plan import MlgcPlan, aligned_recent, plan_from_levels
from atb_llm.runtime.engine import LLMEngine
from atb_llm.runtime.sequence import SamplingParams
from atb_llm.runtime.shared_prefill import Prefilled, capture_prefills


@dataclass
class LossCalibrationConfig:
    """budget: the plan's KV bytes as a share of the full cache's, counted at `reference_tokens`
    tokens per sequence; levels: those a group may take (full is the reference and costs 0);
    context / continuation: tokens of each calibration prompt prefilled / teacher-forced."""

    budget: float = 0.25
    reference_tokens: int = 32768
    sink: int = 64
    recent: int = 1024
    block_size: int = 128
    levels: tuple[str, ...] = ("full", "full_int8", "window", "window_int8")
    context: int = 2048
    continuation: int = 64
    extra: dict = field(default_factory=dict)  # recorded in the plan (where the prompts came from)

    def __post_init__(self):
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget={self.budget} must be in (0, 1]: the share of the full cache's KV bytes")
        if "full" not in self.levels:
            raise ValueError(f"levels={self.levels} must include full (the reference every cost is measured from)")


def continuation_nll(engine: LLMEngine, prefilled: list[Prefilled], continuations: list[list[int]]) -> float:
    """Mean negative log-likelihood of each continuation after its first token, teacher-forced through
    decode from the prefilled prompts, as the engine's current layout caches them."""
    seqs = [
        engine.add_prefilled(replace(p, first_token=c[0]), SamplingParams(force_tokens=tuple(c)))
        for p, c in zip(prefilled, continuations)
    ]
    while engine.has_unfinished():
        engine.step()
    nll = [-lp for s in seqs for step in s.logprobs for lp in step.values()]
    return sum(nll) / len(nll)


def measure_costs(
    engine: LLMEngine, prompts: list[list[int]], context: int, levels: list[Level], progress: bool = True
) -> torch.Tensor:
    """[G, len(levels)] the continuation's mean NLL increase with group g alone at levels[j] (0 for
    full). The prompts' contexts are prefilled once and replayed under every layout
    (atb_llm.runtime.shared_prefill), so each layout costs only its decode steps."""
    base_layout = GroupLayout.uniform(engine.layout.num_layers, engine.layout.num_kv_heads)
    full = base_layout.levels[0]
    engine.set_layout(base_layout)
    prefilled = capture_prefills(engine, [p[:context] for p in prompts])
    continuations = [p[context:] for p in prompts]
    base = continuation_nll(engine, prefilled, continuations)
    costs = torch.zeros(base_layout.num_groups, len(levels), dtype=torch.float64)
    runs = [(g, j) for g in range(base_layout.num_groups) for j, lv in enumerate(levels) if lv != full]
    for g, j in tqdm(runs, desc="Level costs", disable=not progress, unit="layout"):
        one = list(base_layout.levels)
        one[g] = levels[j]
        engine.set_layout(GroupLayout(base_layout.num_layers, base_layout.num_kv_heads, tuple(one)))
        costs[g, j] = continuation_nll(engine, prefilled, continuations) - base
    engine.set_layout(base_layout)
    return costs


def loss_plan(
    engine: LLMEngine, prompts: list[list[int]], cfg: LossCalibrationConfig, progress: bool = True
) -> MlgcPlan:
    """The plan of least measured cost within cfg.budget, made on `engine`'s model."""
    recent = aligned_recent(cfg.sink, cfg.recent, cfg.block_size)
    levels = [make_level(name, cfg.sink, recent) for name in cfg.levels]
    prompts = [p[: cfg.context + cfg.continuation] for p in prompts]
    costs = measure_costs(engine, prompts, cfg.context, levels, progress)
    mc = engine.model_config
    chosen, spent = spend(
        [dict(zip(levels, row.tolist())) for row in costs],
        cfg.budget, cfg.reference_tokens, mc.head_dim, engine.dtype, cfg.block_size,
    )  # fmt: skip
    h = mc.num_key_value_heads
    return plan_from_levels(
        mc,
        chosen,
        cfg.block_size,
        cfg.sink,
        cfg.recent,
        "loss",
        None,
        scores={f"cost {lv.name}": costs[:, j].view(-1, h).tolist() for j, lv in enumerate(levels)},
        calibration={
            **spent,
            "prompts": len(prompts),
            "context": cfg.context,
            "continuation": cfg.continuation,
            **cfg.extra,
        },
    )
