"""RMSNorm with the residual add folded in, numerically as in Hugging Face Qwen2."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """fused: one Triton kernel (`triton_ops.add_rms_norm`, the GPU path) instead of torch operations."""

    def __init__(self, hidden_size: int, eps: float, fused: bool = False):
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H]. With `residual`, returns (norm(x + residual), x + residual)."""
        if self.fused:
            from atb_llm.layers.triton_ops import add_rms_norm  # triton only where it runs

            return add_rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
