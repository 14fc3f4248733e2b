"""One prefill, every cache: what a prompt's prefill stores, captured once and written again under any
group layout, so that comparing caches (full, MLGC plans, streaming, ...) on long prompts costs one
prefill per prompt instead of one per prompt and cache.

This is exact, not an approximation: prefill attends over the whole prompt for every head whatever
the layout, so the keys and values each layer stores, and the first generated token, do not
depend on it; only which of them each group keeps does, and that is the store's work
(`AttentionBackend.store`), which the replay runs with the layout at hand. Decode then reads the
cache as it would after a real prefill. One caveat: the capture measures the K/V channel scales
int8 levels smooth with (LLMEngine.ensure_kv_scales), and the smoothing is an identity only up to
float rounding, so a float-only layout replayed is what an engine that had int8 levels would
compute. Greedy first tokens; prompts are prefilled whole (no chunks, no prefix cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atb_llm.runtime.engine import LLMEngine
from atb_llm.runtime.sequence import SamplingParams


@dataclass
class Prefilled:
    """A prompt after its prefill: `kv[layer]` = (k, v) [T, Hkv, D] as the layer stored them (after
    RoPE and any channel smoothing), and the greedy first token."""

    prompt_ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    first_token: int


def capture_prefills(engine: LLMEngine, prompts: list[list[int]]) -> list[Prefilled]:
    """Prefill `prompts` (in batches of the engine's max_batch_size) and keep what each layer stores."""
    if engine.cfg.chunked_prefill or engine.cfg.prefix_caching:
        raise ValueError("capture whole prefills: run the engine without --chunked_prefill and --prefix_caching")
    engine.ensure_kv_scales()  # the smoothing int8 layouts need changes what every layout stores
    backend, store, out = engine.backend, engine.backend.store, []
    stored: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # layer -> (k, v) of each prompt, in order

    def capture(kv_cache, layer, k, v, meta, *rest):
        if meta.is_prefill:  # prompts are admitted in order, each prefilled whole in one step
            cu = meta.cu_seqlens.tolist()
            stored.setdefault(layer, []).extend((k[a:b].clone(), v[a:b].clone()) for a, b in zip(cu, cu[1:]))
        return store(kv_cache, layer, k, v, meta, *rest)

    backend.store = capture
    try:
        for start in range(0, len(prompts), engine.cfg.max_batch_size):
            batch = prompts[start : start + engine.cfg.max_batch_size]
            stored.clear()
            outs = engine.generate(batch, SamplingParams(max_tokens=1, ignore_eos=True))
            for i, (ids, o) in enumerate(zip(batch, outs)):
                out.append(Prefilled(list(ids), [stored[layer][i] for layer in sorted(stored)], o.token_ids[0]))
    finally:
        del backend.store  # the class's own again
    return out
