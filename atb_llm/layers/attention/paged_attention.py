"""The attention layer on the paged MLGC cache: store this step's K/V, then attend. Where the
model meets the backend, so the model file never dispatches on prefill/decode or on the device.

Where the cache holds int8, the layer also smooths the channels first: keys and values are divided
by per-channel scales, the queries multiplied by the key scales and the output by the value scales
(q.k and the value mix are unchanged), so each token's int8 scale is no longer set by a few outlier
channels. The scales are a C8 checkpoint's (msModelSlim's `kv_cache_scale`), or measured at load
(`observed_kv_scales`). Keys take one scale per rotary pair, sqrt(s_i^2 + s_j^2): the cache holds
keys after RoPE, which mixes channel i with i + head_dim / 2 (msModelSlim calibrates before RoPE),
and dividing both channels of a pair by one number commutes with the rotation.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from atb_llm.cache.kv_cache import KVCache
from atb_llm.layers.attention.backend import AttentionBackend
from atb_llm.layers.attention.metadata import AttentionMetadata
from atb_llm.layers.parallel import SINGLE, TensorParallel
from atb_llm.layers.rotary import apply_rotary


class PagedAttention(nn.Module):
    def __init__(
        self,
        layer_idx: int,
        scale: float,
        backend: AttentionBackend,
        kv_heads: int = 0,
        head_dim: int = 0,
        kv_cache_scales: bool = False,
        tp: TensorParallel = SINGLE,
    ):
        super().__init__()
        self.layer_idx, self.scale, self.backend = layer_idx, scale, backend
        self.kv_scale: nn.Parameter | None = None  # [2 (k, v), kv_heads, head_dim] fp32
        if kv_cache_scales:
            self.kv_scale = nn.Parameter(torch.ones(2, kv_heads, head_dim, dtype=torch.float32), requires_grad=False)
            self.kv_scale.weight_loader = partial(load_kv_cache_scale, tp=tp)  # this rank's KV heads

    def set_kv_scale(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Smooth with these channel scales, [kv_heads, head_dim] each (keys': equal within each rotary pair)."""
        self.kv_scale = nn.Parameter(usable(torch.stack([k, v]).float()), requires_grad=False)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D]. rope: RotaryEmbedding.table of the step's
        positions, which the layer applies to q and k (the backend may fuse it with the decode cache
        write); None: q and k come rotated. Prefill attends over the chunk for every head and over
        what each group keeps of earlier chunks, so it reads the cache before the chunk is written;
        decode writes its token, then reads what each group keeps."""
        if self.kv_scale is None:
            return self._attend(q, k, v, kv_cache, meta, rope)
        ks, vs = self.kv_scale.to(q.dtype)  # keys: one scale per rotary pair, so before or after RoPE alike
        rep = q.shape[1] // k.shape[1]  # query heads per KV head
        q, k, v = q * ks.repeat_interleave(rep, 0), k / ks, v / vs
        return self._attend(q, k, v, kv_cache, meta, rope) * vs.repeat_interleave(rep, 0)

    def _attend(self, q, k, v, kv_cache: KVCache, meta: AttentionMetadata, rope) -> torch.Tensor:
        if not meta.is_prefill:
            q = self.backend.decode_store(q, k, v, rope, kv_cache, self.layer_idx, meta)
            return self.backend.decode(q, kv_cache, self.layer_idx, meta, self.scale)
        if rope is not None:
            q, k = apply_rotary(rope, q, k, self.backend.fused_rope)
        out = self.backend.prefill(q, k, v, kv_cache, self.layer_idx, meta, self.scale)
        self.backend.store(kv_cache, self.layer_idx, k, v, meta)
        return out


def load_kv_cache_scale(
    param: nn.Parameter, loaded: torch.Tensor, name: str, shard_id: str, tp: TensorParallel = SINGLE
) -> None:
    """`k_proj.kv_cache_scale` / `v_proj.kv_cache_scale` [kv_heads * head_dim] -> row 0 / 1 of param.
    Keys take one scale per rotary pair; see `usable`. The offsets are not needed: the int8 cache
    computes its scales per token."""
    loaded = tp.take(loaded.flatten(), 0, param[0].numel()) if loaded.numel() == tp.world * param[0].numel() else loaded
    if loaded.numel() != param[0].numel():
        raise ValueError(
            f"{name} has {loaded.numel()} values but the model has {tuple(param.shape[1:])} KV heads x head_dim; "
            "the C8 checkpoint and config.json do not belong together"
        )
    s = loaded.float().reshape(param.shape[1:])
    param.data[0 if shard_id == "k" else 1] = usable(pair_norm(s) if shard_id == "k" else s)


def observed_kv_scales(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel scales from keys (before or after RoPE alike) and values [T, kv_heads, head_dim], in
    msModelSlim's units (the largest magnitude / 127): per rotary pair the largest norm
    sqrt(k_i^2 + k_j^2), which RoPE does not change, and per value channel the largest |v|."""
    return pair_norm(k.float()).amax(0) / 127, v.float().abs().amax(0) / 127


def pair_norm(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D]: sqrt(x_i^2 + x_j^2) in both channels i and j = i + D/2 of each rotary pair."""
    half = x.shape[-1] // 2
    pair = (x[..., :half] ** 2 + x[..., half:] ** 2).sqrt()
    return torch.cat([pair, pair], -1)


def usable(s: torch.Tensor) -> torch.Tensor:
    """A channel whose scale is 0 or not finite is left as it is (scale 1)."""
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
