"""Reference backend in plain torch (CPU, or any device): gathers each group's blocks and runs SDPA.

Decode processes all query heads of a group together against that group's blocks, so each K/V
block is read once per group per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atb_llm.cache.kv_cache import KVCache
from atb_llm.layers.attention.backend import AttentionBackend
from atb_llm.layers.attention.metadata import AttentionMetadata


class TorchBackend(AttentionBackend):
    name = "torch"

    def prefill(self, q, k, v, layer: int, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        cu = meta.cu_seqlens.tolist()
        for s, e in zip(cu[:-1], cu[1:]):
            qb, kb, vb = (x[s:e].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True)
            out[s:e] = o[0].transpose(0, 1)
        return out

    def decode(self, q, kv_cache: KVCache, layer: int, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        b, hq, d = q.shape
        hkv = kv_cache.layout.num_kv_heads
        qg = q.view(b, hkv, hq // hkv, d)
        out = torch.empty_like(qg)
        for run in kv_cache.layout.runs(layer):
            nb, mask = meta.decode_view(run.level)
            tables = meta.block_tables[run.groups, :, :nb].transpose(0, 1)  # [B, h, nb]
            k, v = kv_cache.pools[run.pool].gather(tables, q.dtype)  # [B, h, S, D]
            if run.all_heads(hkv):
                out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
            else:
                heads = list(run.heads)
                out[:, heads] = F.scaled_dot_product_attention(qg[:, heads], k, v, attn_mask=mask, scale=scale)
        return out.view(b, hq, d)
