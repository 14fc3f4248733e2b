"""Calibration: which groups must keep their whole history, measured on the model itself.

RazorAttention's probes: random token sequences of length L repeated; at each position t of a
repeat, an *echo* head attends to t - L (the same token's previous occurrence) and an *induction*
head to t - L + 1 (the token that followed it, i.e. the one to predict). Such retrieval heads need
the full context; the others do well on sinks + a recent window. A group's score is the max over
the query heads that share its KV head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atb_llm.compression.plan import MlgcPlan, num_full_groups, plan_from_selection, select_full
from atb_llm.layers.attention.torch_backend import TorchBackend
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


def calibrate(
    model_path: str, cfg: CalibrationConfig, dtype: str | None = None, progress: bool = True, device: str = "cpu"
) -> MlgcPlan:
    """Probe the model at `model_path` (on `device`) and return its plan."""
    config = get_router(model_path).get_config()
    probe = ProbeBackend(config.num_hidden_layers, config.num_attention_heads, cfg.period)
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
    echo, induction = probe.group_scores(config.num_key_value_heads)
    full = choose_full(echo.flatten().tolist(), induction.flatten().tolist(), num_full_groups(config, cfg.full_ratio))
    return plan_from_selection(
        config,
        full,
        cfg.block_size,
        cfg.sink,
        cfg.recent,
        cfg.int8,
        "razor",
        cfg.full_ratio,
        scores={"echo": echo.tolist(), "induction": induction.tolist()},
        calibration={"seed": cfg.seed, "samples": cfg.samples, "period": cfg.period, "repeats": cfg.repeats},
    )
