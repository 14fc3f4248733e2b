"""The attention layer on the paged MLGC cache: store this step's K/V, then attend. Where the
model meets the backend, so the model file never dispatches on prefill/decode or on the device."""

from __future__ import annotations

import torch
from torch import nn

from atb_llm.cache.kv_cache import KVCache
from atb_llm.layers.attention.backend import AttentionBackend
from atb_llm.layers.attention.metadata import AttentionMetadata


class PagedAttention(nn.Module):
    def __init__(self, layer_idx: int, scale: float, backend: AttentionBackend):
        super().__init__()
        self.layer_idx, self.scale, self.backend = layer_idx, scale, backend

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] (keys after RoPE) -> [T, Hq, D]. Prefill attends over
        the chunk for every head and over what each group keeps of earlier chunks, so it reads the
        cache before the chunk is written; decode writes its token, then reads what each group keeps."""
        if meta.is_prefill:
            out = self.backend.prefill(q, k, v, kv_cache, self.layer_idx, meta, self.scale)
            self.backend.store(kv_cache, self.layer_idx, k, v, meta)
            return out
        self.backend.store(kv_cache, self.layer_idx, k, v, meta)
        return self.backend.decode(q, kv_cache, self.layer_idx, meta, self.scale)
