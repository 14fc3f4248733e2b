"""Picks the attention backend for a device. The backends do not import this module, so the
interface (backend.py) stays below its implementations and the selector above them."""

from __future__ import annotations

import torch

from atb_llm.layers.attention.backend import AttentionBackend

BY_DEVICE = {"cpu": "torch", "cuda": "triton", "npu": "npu"}


def get_backend(device: torch.device | str, name: str | None = None) -> AttentionBackend:
    """The attention backend for `device`: torch on cpu, triton on cuda, npu on npu. `name`
    ("torch", "triton", "npu") forces one, e.g. the torch reference on a GPU, or the Triton
    kernels on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1)."""
    if name is None:
        name = BY_DEVICE.get(str(device).split(":")[0])  # not torch.device(): "npu" parses only with torch_npu
        if name is None:
            raise ValueError(f"device={device!r} has no attention backend; use cpu, cuda or npu")
    if name == "torch":
        from atb_llm.layers.attention.torch_backend import TorchBackend

        return TorchBackend()
    if name == "triton":
        from atb_llm.layers.attention.triton_backend import TritonBackend

        return TritonBackend()
    if name == "npu":
        from atb_llm.layers.attention.npu_backend import NpuBackend

        return NpuBackend()
    raise ValueError(f"attention backend {name!r} is unknown; use torch, triton or npu (or None: by device)")
