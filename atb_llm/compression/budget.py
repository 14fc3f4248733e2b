"""Levels chosen by measured cost under a KV byte budget.

Each group may take any of a few levels; a level costs the group its measured loss (how much the
model's output changes when that group alone is kept at that level) and the bytes its blocks take
at a reference length (from the level registry: whole blocks of its storage). The choice is a
multiple-choice knapsack: one level per group, total bytes within the budget, least summed cost.
It is solved exactly by dynamic programming over bytes counted in units of the gcd of the levels'
sizes (a few thousand units per group at 32K tokens).
"""

from __future__ import annotations

import math
from functools import reduce

import numpy as np

from atb_llm.compression.levels import Level


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
