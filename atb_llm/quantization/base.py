"""The common ground of the quantized linear methods."""

from __future__ import annotations

import torch

from atb_llm.layers.linear import LinearBase, LinearMethod


def constant_zero_groups(scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """msModelSlim writes a group whose weights are all zero with scale 0 and offset NaN (0 / 0):
    read it as zero (offset 0) so that (q - offset) * scale does not make NaN."""
    return torch.where(scale == 0, torch.zeros_like(offset), offset)


class QuantMethod(LinearMethod):
    """group_size: the checkpoint's (0 = per channel); from_float: the layer loads a float weight
    and quantizes it once loaded (`--quantize`), where the format allows; gpu_gemms: run the GPU
    kernels (True), or not (False), whatever the device (None: on CUDA tensors)."""

    supports_from_float = False

    def __init__(self, group_size: int = 0, from_float: bool = False, gpu_gemms: bool | None = None):
        if from_float and not self.supports_from_float:
            raise ValueError(f"{type(self).__name__} needs calibrated activation scales; it cannot be made at load")
        self.group_size, self.from_float, self.gpu_gemms = group_size, from_float, gpu_gemms

    def gpu_kernels(self, layer: LinearBase) -> bool:
        """Whether products run in the GPU kernels (Triton weight-only GEMM, torch._int_mm): on CUDA
        tensors, or wherever the backend asks for them (the triton backend; on CPU tensors that is Triton's
        interpreter, TRITON_INTERPRET=1: how the tests and bench_gpu's CPU run check this path)."""
        return self.gpu_gemms if self.gpu_gemms is not None else layer.weight.device.type == "cuda"

    @staticmethod
    def dense_fp32(layer: LinearBase) -> bool:
        """Whether the layer computes in fp32 on the CPU, where torch's weight-only int8/int4 kernels
        are slow on fp32 activations (measured on a 4864 x 896 linear, AVX2: at 512 rows 1257 ms int8
        and 2258 ms int4 against 52 ms dequantize + fp32 matmul): the methods then dequantize per
        call or give the kernels bf16 activations (W8A16, W4A16)."""
        return layer.dtype == torch.float32 and layer.weight.device.type == "cpu"
