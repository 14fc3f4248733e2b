"""Calibration: which groups must keep their whole history, measured on the model itself.

RazorAttention's probes: random token sequences of length L repeated; at each position t of a
repeat, an *echo* head attends to t - L (the same token's previous occurrence) and an *induction*
head to t - L + 1 (the token that followed it, i.e. the one to predict). Such retrieval heads need
the full context; the others do well on sinks + a recent window. A group's score is the max over
the query heads that share its KV head.

Two ways to spend the scores: `full_ratio` keeps that share of the groups full (RazorAttention's
split: top echo groups, then induction) and windows the rest; `kv_budget` spends a share of the full
cache's KV bytes over every level (full, window and, with `int8`, their int8 twins) by the
knapsack of atb_llm.compression.budget, with the scores as costs: as many groups as the bytes allow
keep their whole history, the rest, those of least score, become windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atb_llm.compression.budget import retrieval_costs, spend
from atb_llm.compression.levels import Level, Window
from atb_llm.compression.plan import (
    MlgcPlan,
    aligned_recent,
    num_full_groups,
    plan_from_levels,
    plan_from_selection,
    select_full,
)
from atb_llm.layers.attention.torch_backend import TorchBackend
from atb_llm.layers.parallel import TensorParallel
from atb_llm.models.base.router import get_router
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams

ECHO_SHARE = 0.01 / (0.01 + 0.14)  # RazorAttention keeps ~1% echo and ~14% induction heads


class ProbeBackend(TorchBackend):
    """The torch backend, plus: during prefill, the mean attention each query head pays to the echo
    and induction positions of the repeated probe (sequences are `period`-periodic)."""

    name = "probe"

    def __init__(self, num_layers: int, num_heads: int, period: int):
        self.period = period
        self.echo = torch.zeros(num_layers, num_heads, dtype=torch.float64)
        self.induction = torch.zeros(num_layers, num_heads, dtype=torch.float64)
        self.rows = torch.zeros(num_layers, dtype=torch.float64)

    def prefill(self, q, k, v, kv_cache, layer, meta, scale):
        if meta.has_context:
            raise RuntimeError("calibration probes whole prompts; run it without chunked prefill or prefix caching")
        cu = meta.cu_seqlens.tolist()
        for s, e in zip(cu[:-1], cu[1:]):
            self._probe(q[s:e], k[s:e], layer, scale)
        return super().prefill(q, k, v, kv_cache, layer, meta, scale)

    def _probe(self, q: torch.Tensor, k: torch.Tensor, layer: int, scale: float) -> None:
        """q: [T, Hq, D], k: [T, Hkv, D] of one sequence; rows t >= period are repeats."""
        t_len, hq, _ = q.shape
        p = self.period
        if t_len <= p:
            return
        k = k.float().repeat_interleave(hq // k.shape[1], dim=1)  # [T, Hq, D]
        rows = torch.arange(p, t_len)
        logits = torch.einsum("rhd,thd->hrt", q[p:].float(), k) * scale  # [Hq, R, T]
        logits.masked_fill_(torch.arange(t_len)[None, None, :] > rows[None, :, None], float("-inf"))
        probs = logits.softmax(-1)
        r = torch.arange(len(rows))
        self.echo[layer] += probs[:, r, rows - p].sum(-1).double()
        self.induction[layer] += probs[:, r, rows - p + 1].sum(-1).double()
        self.rows[layer] += len(rows)

    def group_scores(self, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean echo and induction scores per group: [layers, kv_heads], max over each group's query heads."""

        def per_group(x: torch.Tensor) -> torch.Tensor:
            mean = x / self.rows.clamp(min=1)[:, None]
            return mean.view(mean.shape[0], num_kv_heads, -1).amax(-1)

        return per_group(self.echo), per_group(self.induction)


@dataclass
class CalibrationConfig:
    full_ratio: float = 0.25
    kv_budget: float | None = None  # set: spend this share of the full cache's bytes instead of full_ratio
    reference_tokens: int = 32768  # the sequence length kv_budget counts bytes at
    sink: int = 64
    recent: int = 1024
    int8: bool = False
    block_size: int = 128
    samples: int = 4  # random sequences
    period: int = 256  # tokens before the sequence repeats
    repeats: int = 2
    seed: int = 0


def probe_tokens(cfg: CalibrationConfig, vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(cfg.seed)
    base = torch.randint(100, vocab_size, (cfg.samples, cfg.period), generator=gen)
    return base.repeat(1, cfg.repeats).tolist()


def choose_full(echo: list[float], induction: list[float], num_full: int) -> set[int]:
    """RazorAttention's split of the budget: top echo groups first (its ~1:14 share), then induction."""
    num_echo = min(num_full, max(1, round(num_full * ECHO_SHARE))) if num_full else 0
    full = select_full(echo, num_echo)
    for g in sorted(range(len(induction)), key=lambda g: (-induction[g], g)):
        if len(full) >= num_full:
            break
        full.add(g)
    return full


def retrieval_scores(echo: list[float], induction: list[float]) -> list[float]:
    """One score per group in [0, 1]: the larger of its echo and induction scores, each divided by
    the largest of its kind."""
    top_e, top_i = max(max(echo), 1e-12), max(max(induction), 1e-12)
    return [max(e / top_e, i / top_i) for e, i in zip(echo, induction)]


def budget_levels(
    echo: list[float], induction: list[float], cfg: CalibrationConfig, head_dim: int, dtype
) -> tuple[list[Level], dict]:
    """Per group, the level the knapsack gives it within cfg.kv_budget (see the module's docstring)."""
    full, window = Level(), Window(cfg.sink, aligned_recent(cfg.sink, cfg.recent, cfg.block_size))
    levels = [full, window] + ([full.as_int8(), window.as_int8()] if cfg.int8 else [])
    costs = retrieval_costs(retrieval_scores(echo, induction), levels)
    return spend(costs, cfg.kv_budget, cfg.reference_tokens, head_dim, dtype, cfg.block_size)


def calibrate(
    model_path: str, cfg: CalibrationConfig, dtype: str | None = None, progress: bool = True, device: str = "cpu"
) -> MlgcPlan:
    """Probe the model at `model_path` (on `device`) and return its plan. At tensor-parallel world
    size N each rank probes its own query heads and the scores of every group are gathered, so every
    rank returns the plan of world size 1."""
    config, tp = get_router(model_path).get_config(), TensorParallel.current()
    probe = ProbeBackend(
        config.num_hidden_layers, tp.local(config.num_attention_heads, "num_attention_heads"), cfg.period
    )
    seq_len = cfg.period * cfg.repeats
    engine_cfg = EngineConfig(
        model_path,
        dtype=dtype,
        device=device,
        max_batch_size=1,
        max_input_length=seq_len,
        max_output_length=1,
        block_size=cfg.block_size,
        progress=progress,
    )
    engine = LLMEngine(engine_cfg, backend=probe)
    engine.generate(probe_tokens(cfg, config.vocab_size), SamplingParams(max_tokens=1), use_tqdm=progress)
    echo, induction = (
        tp.all_gather(x) for x in probe.group_scores(engine.tp.local(config.num_key_value_heads, "num_key_value_heads"))
    )
    e, i = echo.flatten().tolist(), induction.flatten().tolist()
    scores = {"echo": echo.tolist(), "induction": induction.tolist()}
    probes = {"seed": cfg.seed, "samples": cfg.samples, "period": cfg.period, "repeats": cfg.repeats}
    if cfg.kv_budget is not None:
        chosen, spent = budget_levels(e, i, cfg, config.head_dim, engine.dtype)
        return plan_from_levels(
            config, chosen, cfg.block_size, cfg.sink, cfg.recent, "razor", None,
            scores=scores, calibration={**spent, **probes},
        )  # fmt: skip
    full = choose_full(e, i, num_full_groups(config, cfg.full_ratio))
    return plan_from_selection(
        config, full, cfg.block_size, cfg.sink, cfg.recent, cfg.int8, "razor", cfg.full_ratio,
        scores=scores, calibration=probes,
    )  # fmt: skip
