"""Linear layers with per-parameter weight loaders, so fused projections load from Hugging Face names.

How a layer holds its weights and multiplies is a `LinearMethod` injected at construction (plain,
or one of the quantized formats in `atb_llm.quantization`); model code never sees which. A method
creates the layer's parameters (`create_weights`), may repack them once loaded
(`process_weights_after_loading`) and computes the product (`apply`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atb_llm.layers.lora import LoraWeights
from atb_llm.layers.parallel import SINGLE, TensorParallel


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
    """Plain matmul in the model dtype. On CPU, bf16 weights are repacked once for oneDNN where the
    CPU has the bf16 instructions for it (AVX512-BF16/AMX: about 1.5x the generic kernel)."""

    def create_weights(self, layer: LinearBase, bias: bool) -> None:
        layer.add_param("weight", (layer.output_size, layer.input_size))
        if bias:
            layer.add_param("bias", (layer.output_size,))

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        w = layer.weight
        layer.packed = None
        if w.device.type == "cpu" and w.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available():
            try:
                layer.packed = torch.ops.mkldnn._reorder_linear_weight(w.data, batch_size=1)
            except (RuntimeError, AttributeError):  # a torch or a CPU without the oneDNN bf16 linear
                return
            if not layer.shares_weight:  # keep one copy in memory: the packed one
                w.data = torch.empty(0, dtype=w.dtype)

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        if layer.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, layer.packed, layer.bias, "none", [], "")
        return F.linear(x, layer.weight, layer.bias)


class LinearBase(nn.Module):
    """input_size / output_size: this rank's. `parallel`: None (whole on every rank), "column" (each
    rank its rows of the output: every per-output tensor is cut along dim 0 at load) or "row" (each
    rank its columns of the input: 2-D tensors are cut along dim 1, per-output ones stay whole, the
    partial products are all-reduced and a bias is added by rank 0 alone)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool,
        method: LinearMethod | None = None,
        tp: TensorParallel = SINGLE,
        parallel: str | None = None,
    ):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.tp, self.parallel = tp, parallel if tp.world > 1 else None
        self.dtype = torch.get_default_dtype()  # the model dtype (models are built under it)
        self.method = method or LinearMethod()
        self.packed = None
        self.shares_weight = False  # True when tied to the embedding
        self.lora: LoraWeights | None = None  # LoRA adapters, when the model has some for this linear
        self.method.create_weights(self, bias)
        if not bias:
            self.bias = None

    def add_param(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None, pack: int = 1, shared: bool = False
    ) -> nn.Parameter:
        """A parameter loaded from the checkpoint tensor of the same name. `pack`: output rows per
        stored row (2 for int4 packed along the output dimension); `shared`: one value for the whole
        layer (a per-tensor scale), which every fused shard must repeat."""
        p = nn.Parameter(torch.empty(shape, dtype=dtype or self.dtype), requires_grad=False)
        p.weight_loader, p.pack, p.shared = self.weight_loader, pack, shared
        self.register_parameter(name, p)
        return p

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, name: str, shard_id=None) -> None:
        default_weight_loader(param, self.shard(param, loaded, param.shape[0], name), name)

    def shard(self, param: nn.Parameter, loaded: torch.Tensor, rows: int, name: str) -> torch.Tensor:
        """This rank's part of a checkpoint tensor (`rows`: its length along dim 0 here)."""
        if self.parallel is None or getattr(param, "shared", False):
            return loaded
        if self.parallel == "column":
            return self.tp.take(loaded, 0, rows)
        if name.endswith("bias") and self.tp.rank:  # row-parallel: added once, after the all-reduce
            return torch.zeros_like(loaded)
        if loaded.dim() != 2:
            return loaded
        if name.endswith("weight") and getattr(self.method, "from_float", False):  # quantized here, at load:
            self.whole_row_absmax = loaded.float().abs().amax(1, keepdim=True)  # per-channel scales of whole rows
        return self.tp.take(loaded, 1, param.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self, x)
        if self.lora is not None:
            y = self.lora.add(x, y)
        return self.tp.all_reduce(y) if self.parallel == "row" else y


class ReplicatedLinear(LinearBase):
    """One Hugging Face linear, loaded as is."""


class MergedLinear(LinearBase):
    """Several Hugging Face linears stacked along the output dimension (q/k/v, gate/up).

    `shards` maps each shard id to its output size, in stacking order.
    """

    def __init__(
        self,
        input_size: int,
        shards: dict,
        bias: bool,
        method: LinearMethod | None = None,
        tp: TensorParallel = SINGLE,
        parallel: str | None = None,
    ):
        self.offsets, start = {}, 0
        for shard_id, size in shards.items():
            self.offsets[shard_id] = (start, size)
            start += size
        super().__init__(input_size, start, bias, method, tp, parallel)
        self._shared_seen: dict[str, tuple] = {}

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, name: str, shard_id=None) -> None:
        if getattr(param, "shared", False):
            self._load_shared(param, loaded, name, shard_id)
            return
        start, size = self.offsets[shard_id]
        pack = getattr(param, "pack", 1)
        target = param.data.narrow(0, start // pack, size // pack)
        loaded = self.shard(param, loaded, size // pack, name)
        _check_shape(name, target, loaded)
        target.copy_(loaded)

    def _load_shared(self, param: nn.Parameter, loaded: torch.Tensor, name: str, shard_id) -> None:
        """A per-tensor value (e.g. W8A8's input_scale): the fused shards must agree on it."""
        _check_shape(name, param, loaded)
        key = next(k for k, p in self.named_parameters(recurse=False) if p is param)
        seen = self._shared_seen.get(key)
        if seen is not None and not torch.equal(seen[1], loaded):
            raise ValueError(
                f"{name} = {loaded.flatten().tolist()} differs from shard {seen[0]!r}'s {seen[1].flatten().tolist()}; "
                "the projections fused here (q/k/v or gate/up) must share one activation scale and offset. "
                "Re-export the checkpoint with msModelSlim so that they do"
            )
        self._shared_seen[key] = (shard_id, loaded.clone())
        param.data.copy_(loaded)
