"""Ascend backend. torch_npu registers the `npu` device, on which the reference torch path runs as
is (gather of each group's blocks + SDPA); fused Ascend attention operators can replace
`prefill` / `decode` here without touching model code."""

from __future__ import annotations

from atb_llm.layers.attention.torch_backend import TorchBackend


class NpuBackend(TorchBackend):
    name = "npu"

    def __init__(self):
        try:
            import torch_npu  # noqa: F401  (registers the npu device)
        except ImportError as err:
            raise RuntimeError(
                "device=npu needs torch_npu (Ascend Extension for PyTorch) matching your CANN and torch "
                "versions; install it, or run with --device cpu"
            ) from err
