"""K/V channel scales measured on the model itself, for int8 levels without a C8 checkpoint's scales.

One prompt of random tokens is prefilled in one piece into a float cache of its own, so the scales
depend on the model alone (not on the layout, chunking or prefix cache); every layer's
PagedAttention then smooths with them, as with a checkpoint's (see PagedAttention.set_kv_scale).
"""

from __future__ import annotations

import torch

from atb_llm.cache.kv_cache import KVCache
from atb_llm.compression.layout import GroupLayout
from atb_llm.config import ModelConfig
from atb_llm.layers.attention.paged_attention import PagedAttention, observed_kv_scales
from atb_llm.models.base.forward_batch import ForwardBatch

KV_PROBE_TOKENS = 256  # random tokens of the probe prompt


def measure_kv_scales(
    model: torch.nn.Module, cfg: ModelConfig, dtype: torch.dtype, device: str, block_size: int
) -> None:
    """Set every PagedAttention layer's K/V smoothing scales from one probe forward."""
    n = min(KV_PROBE_TOKENS, cfg.max_position_embeddings)
    layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
    seen: dict[PagedAttention, tuple[torch.Tensor, torch.Tensor]] = {}

    def observe(layer: PagedAttention, args: tuple) -> None:  # args: q, k, v, kv_cache, meta, rope
        seen[layer] = observed_kv_scales(args[1], args[2])

    full = GroupLayout.uniform(cfg.num_hidden_layers, cfg.num_key_value_heads // model.tp.world)  # this rank's
    nb = -(-n // block_size)
    kv = KVCache.allocate(full, {"model": full.num_groups * nb}, block_size, cfg.head_dim, dtype, device)
    tables = torch.arange(full.num_groups * nb, device=device).view(full.num_groups, 1, nb)  # [G, 1, nb]
    slots = (tables[:, 0, :, None] * block_size + torch.arange(block_size, device=device)).flatten(1)[:, :n]  # [G, n]
    probe = torch.randint(100, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).to(device)
    hooks = [m.register_forward_pre_hook(observe) for m in layers]
    try:
        last, length = torch.tensor([n - 1], device=device), torch.tensor([n], device=device)
        model(ForwardBatch(probe, torch.arange(n, device=device), True, kv, tables, slots, length, n, last))
    finally:
        for h in hooks:
            h.remove()
    for m in layers:
        m.set_kv_scale(*seen[m])
