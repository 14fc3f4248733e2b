"""Reference backend in plain torch (CPU, or any device): gathers each group's blocks and runs SDPA.

Decode processes all query heads of a group together against that group's blocks, so each K/V
block is read once per group per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atb_llm.cache.kv_cache import KVCache
from atb_llm.layers.attention.backend import AttentionBackend
from atb_llm.layers.attention.metadata import AttentionMetadata, level_mask


class TorchBackend(AttentionBackend):
    name = "torch"

    def prefill(self, q, k, v, kv_cache: KVCache, layer: int, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        cu = meta.cu_seqlens.tolist()
        for b, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
            if meta.context_lens[b]:
                out[s:e] = self._chunk(q[s:e], k[s:e], v[s:e], kv_cache, layer, meta, b, scale)
                continue
            qb, kb, vb = (x[s:e].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True)
            out[s:e] = o[0].transpose(0, 1)
        return out

    @staticmethod
    def _chunk(q, k, v, kv_cache: KVCache, layer: int, meta: AttentionMetadata, b: int, scale: float) -> torch.Tensor:
        """One sequence's chunk after `c` cached tokens: each run's heads attend over the slots their
        level keeps at length c (decode's geometry there, compensation slot included), then over
        the chunk causally. q: [L, Hq, D]; k, v: [L, Hkv, D] -> [L, Hq, D]."""
        n, hq, d = q.shape
        hkv = kv_cache.layout.num_kv_heads
        c = torch.tensor([meta.context_lens[b]], device=meta.input_lengths.device)
        out = torch.empty(n, hkv, hq // hkv, d, dtype=q.dtype, device=q.device)
        qg = q.view(n, hkv, hq // hkv, d)
        for run in kv_cache.layout.runs(layer):
            level, heads = run.level, list(run.heads)
            read = int(level.read_len(c))
            nb = -(-read // meta.block_size)
            kc, vc = kv_cache.pools[run.pool].gather(meta.block_tables[run.groups, b, :nb], q.dtype)  # [h, S, D]
            qr = qg[:, heads].flatten(1, 2).transpose(0, 1).unsqueeze(0)  # [1, h * gq, L, D]
            if level.comp_slot is None and q.device.type == "cpu":  # every cached slot counts: no mask
                o = _prefix_then_causal(qr, kc[:, :read], vc[:, :read], k[:, heads], v[:, heads], scale)
                out[:, heads] = o[0].transpose(0, 1).unflatten(1, (len(heads), -1))
                continue
            mask = torch.empty(n, kc.shape[1] + n, dtype=q.dtype, device=q.device)
            mask[:, : kc.shape[1]] = level_mask(level, c, kc.shape[1], q.dtype)
            mask[:, kc.shape[1] :] = torch.full((n, n), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
            kr = torch.cat([kc, k[:, heads].transpose(0, 1)], 1).unsqueeze(0)  # [1, h, S + L, D]
            vr = torch.cat([vc, v[:, heads].transpose(0, 1)], 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, scale=scale, enable_gqa=True)
            out[:, heads] = o[0].transpose(0, 1).unflatten(1, (len(heads), -1))
        return out.view(n, hq, d)

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


def _prefix_then_causal(q, kc, vc, k, v, scale: float) -> torch.Tensor:
    """Attention over cached keys (all visible) and then the chunk's own keys (causal), as two
    flash-attention calls merged by their log-sum-exp: no [L, S + L] mask to build and read.
    q: [1, Hq, L, D]; kc, vc: [h, S, D]; k, v: [L, h, D] -> [1, Hq, L, D]. CPU only."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    rep = q.shape[1] // kc.shape[0]
    kc, vc = (x.repeat_interleave(rep, 0).unsqueeze(0) for x in (kc, vc))
    k, v = (x.transpose(0, 1).repeat_interleave(rep, 0).unsqueeze(0) for x in (k, v))
    o1, lse1 = flash(q, kc, vc, 0.0, False, scale=scale)
    o2, lse2 = flash(q, k, v, 0.0, True, scale=scale)
    m = torch.maximum(lse1, lse2)
    w1, w2 = (lse1 - m).exp().unsqueeze(-1), (lse2 - m).exp().unsqueeze(-1)
    return ((o1 * w1 + o2 * w2) / (w1 + w2)).to(q.dtype)
