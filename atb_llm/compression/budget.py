"""Levels chosen by measured cost under a KV byte budget.

Each group may take any of a few levels; a level costs the group its measured loss (how much the
model's output changes when that group alone is kept at that level) and the bytes its blocks take
at a reference length (from the level registry: whole blocks of its storage). The choice is a
multiple-choice knapsack: one level per group, total bytes within the budget, least summed cost.
It is solved exactly by dynamic programming over bytes counted in units of the gcd of the levels'
sizes (a few thousand units per group at 32K tokens).

The costs come from a measurement (atb_llm.runtime.level_costs: the loss when a group alone takes
a level) or from retrieval-head scores (`retrieval_costs`: the RazorAttention ranking, spent over
every level the bytes allow).
"""

from __future__ import annotations

import math
from functools import reduce

import numpy as np
import torch

from atb_llm.compression.levels import Level, Window
from atb_llm.compression.memory import level_bytes

INT8_COST = 1e-3  # int8 keeps every token, a little blurred: far cheaper than a window, dearer than full


def choose_levels(costs: list[dict[Level, float]], sizes: dict[Level, int], budget: int) -> list[Level]:
    """costs[g][level]: the cost of group g at each level it may take; sizes[level]: its bytes.
    Returns one level per group, of least total cost with total bytes <= budget (ties: the fewer
    bytes, then the order of the levels in costs[g]). Raises ValueError when even the smallest
    levels exceed the budget."""
    unit = reduce(math.gcd, sizes.values())
    width = {lv: sizes[lv] // unit for lv in sizes}
    cap = budget // unit
    least = sum(min(width[lv] for lv in c) for c in costs)
    if least > cap:
        raise ValueError(
            f"a KV budget of {budget} bytes cannot hold even the smallest level of every group "
            f"({least * unit} bytes); raise the budget"
        )
    inf = np.inf
    best = np.full(cap + 1, inf)  # best[b]: least cost of the groups so far using exactly b units
    best[0] = 0.0
    picks = []  # per group: [cap + 1] index of the level chosen to reach each b
    for c in costs:
        levels = list(c)
        nxt, pick = np.full(cap + 1, inf), np.full(cap + 1, -1, dtype=np.int64)
        for i, lv in enumerate(levels):
            w = width[lv]
            if w > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[w:] = best[: cap + 1 - w] + c[lv]
            better = cand < nxt
            nxt[better], pick[better] = cand[better], i
        best = nxt
        picks.append((levels, pick))
    total = int(np.flatnonzero(best == best.min())[0])  # the least cost, in the fewest bytes
    chosen = []
    for levels, pick in reversed(picks):
        lv = levels[pick[total]]
        chosen.append(lv)
        total -= width[lv]
    return chosen[::-1]


def retrieval_costs(scores: list[float], levels: list[Level]) -> list[dict[Level, float]]:
    """Knapsack costs from retrieval-head scores in [0, 1] (one per group): a window costs its group
    1 + score (every window loses the history it drops, a retrieval head the most), int8 adds
    INT8_COST times that much again. Spent under a budget, this keeps the whole history of as many
    groups as the bytes allow (int8 where it must), windows the groups of least score, and keeps
    the groups of highest score in full precision first."""
    return [
        {lv: (1.0 + s) * ((1.0 if isinstance(lv, Window) else 0.0) + (INT8_COST if lv.int8 else 0.0)) for lv in levels}
        for s in scores
    ]


def spend(
    costs: list[dict[Level, float]],
    share: float,
    reference_tokens: int,
    head_dim: int,
    dtype: torch.dtype,
    block_size: int,
) -> tuple[list[Level], dict]:
    """The levels of least summed cost whose KV bytes, for one sequence of `reference_tokens`
    tokens, stay within `share` of the full cache's; and the record a plan keeps of it."""
    if not 0 < share <= 1:
        raise ValueError(f"kv_budget={share} must be in (0, 1]: the share of the full cache's KV bytes")
    levels = {lv for c in costs for lv in c}
    sizes = {lv: level_bytes(lv, reference_tokens, head_dim, dtype, block_size) for lv in levels}
    full = level_bytes(Level(), reference_tokens, head_dim, dtype, block_size)
    budget = int(share * full * len(costs))
    chosen = choose_levels(costs, sizes, budget)
    record = {
        "budget": share,
        "reference_tokens": reference_tokens,
        "kv_bytes": sum(sizes[lv] for lv in chosen),
        "budget_bytes": budget,
        "dtype": str(dtype).removeprefix("torch."),
    }
    return chosen, record
