"""Rotary position embedding (neox layout, as Qwen2), with a cos/sin table built once; plain or
static YaRN (Qwen2.5's long-context setting, arXiv 2309.00071, as transformers computes it)."""

from __future__ import annotations

import math

import torch
from torch import nn

from atb_llm.config import RopeScaling


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(head_dim: int, base: float, s: RopeScaling) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2], cos/sin scale). Dimensions that turn fewer than
    `beta_slow` times over the pretraining length are interpolated (frequency / factor), those that
    turn more than `beta_fast` times are kept, with a linear ramp between."""
    freqs = base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times
        return (
            head_dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))
        )

    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (the original frequency), 0: interpolate
    inv_freq = (1 / (s.factor * freqs)) * (1 - keep) + (1 / freqs) * keep
    if s.attention_factor is not None:
        scale = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        scale = yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    else:
        scale = yarn_mscale(s.factor)
    return inv_freq, scale


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float, scaling: RopeScaling | None = None):
        super().__init__()
        if scaling is None:
            inv_freq, scale = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)), 1.0
        else:
            inv_freq, scale = yarn_inv_freq(head_dim, base, scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.max_position = max_position
        self.register_buffer("cos", emb.cos() * scale, persistent=False)  # [max_position, head_dim] fp32
        self.register_buffer("sin", emb.sin() * scale, persistent=False)

    def table(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> (cos, sin) [T, 1, D] in `dtype`; looked up once per forward, used by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(
    rope: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor, fused: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """rope: RotaryEmbedding.table(positions); q: [T, Hq, D], k: [T, Hkv, D] -> rotated q and k.
    fused: one Triton kernel for both (`triton_ops.rotary`, the GPU path) where D / 2 is a power of two."""
    d = q.shape[-1]
    if fused and (d // 2) & (d // 2 - 1) == 0:  # a power of two: tl.arange needs one
        from atb_llm.layers.triton_ops import rotary  # triton only where it runs

        return rotary(rope, q, k)
    cos, sin = rope
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
