"""Linear layers with per-parameter weight loaders, so fused projections load from Hugging Face names.

How a layer multiplies is a `LinearMethod` injected at construction (plain, or a quantized one);
model code never sees which.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check_shape(name: str, param: torch.Tensor, loaded: torch.Tensor) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(
            f"weight {name} has shape {tuple(loaded.shape)} but the model built from config.json expects "
            f"{tuple(param.shape)}; the checkpoint and its config.json do not belong together"
        )


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, name: str, shard_id=None) -> None:
    _check_shape(name, param, loaded)
    param.data.copy_(loaded)


class LinearMethod:
    """Plain matmul in the model dtype. On CPU, bf16 weights are repacked once for oneDNN,
    which reads them about 1.5x faster than the generic kernel on AMX/AVX512 machines."""

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        w = layer.weight
        layer.packed = None
        if w.device.type == "cpu" and w.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available():
            try:
                layer.packed = torch.ops.mkldnn._reorder_linear_weight(w.data, batch_size=1)
            except (RuntimeError, AttributeError):  # a torch without the oneDNN linear ops
                return
            if not layer.shares_weight:  # keep one copy in memory: the packed one
                w.data = torch.empty(0, dtype=w.dtype)

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        if layer.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, layer.packed, layer.bias, "none", [], "")
        return F.linear(x, layer.weight, layer.bias)


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool, method: LinearMethod | None = None):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.method = method or LinearMethod()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        self.packed = None
        self.shares_weight = False  # True when tied to the embedding

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, name: str, shard_id=None) -> None:
        default_weight_loader(param, loaded, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)


class ReplicatedLinear(LinearBase):
    """One Hugging Face linear, loaded as is."""


class MergedLinear(LinearBase):
    """Several Hugging Face linears stacked along the output dimension (q/k/v, gate/up).

    `shards` maps each shard id to its output size, in stacking order.
    """

    def __init__(self, input_size: int, shards: dict, bias: bool, method: LinearMethod | None = None):
        super().__init__(input_size, sum(shards.values()), bias, method)
        self.offsets, start = {}, 0
        for shard_id, size in shards.items():
            self.offsets[shard_id] = (start, size)
            start += size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, name: str, shard_id=None) -> None:
        start, size = self.offsets[shard_id]
        target = param.data.narrow(0, start, size)
        _check_shape(name, target, loaded)
        target.copy_(loaded)
