"""W8A16: int8 weights with a scale and offset per output channel, 16-bit activations.

Checkpoint: weight int8 [N, K], weight_scale and weight_offset [N, 1]; W = (q - offset) * scale.
On CPU, bf16/fp16 products run in torch's weight-only int8 kernel (`_weight_int8pack_mm`), which
reads the int8 weight directly: half the bytes of bf16 per decode step. The kernel has no fast
fp32 path (24x slower than a dense fp32 matmul at 512 rows on an AVX2 CPU), so fp32 models
give it bf16 activations in decode-sized products (at most DECODE_ROWS rows: W8A16 means 16-bit
activations) and dequantize the weight per call for larger ones (see `QuantMethod.dense_fp32`).
On CUDA the product runs in the Triton kernel of `triton_gemm`, which dequantizes the int8 tile
in registers.
"""

from __future__ import annotations

import torch

from atb_llm.layers.linear import LinearBase
from atb_llm.quantization.base import QuantMethod, constant_zero_groups

# fp32 models: up to this many rows (decode batches) the int8 kernel runs on bf16 activations, the
# format's A16 (one 4864 x 896 linear, AVX2, one thread: 0.44 ms at 1 row against 0.73 ms fp32
# dense and 3.6 ms dequantize + matmul; at 16 rows 4.9 / 4.1 / 8.2 ms; at 128 rows dequantize +
# matmul wins, 24 ms against 36 ms)
DECODE_ROWS = 16


def quantize_w8_per_channel(
    w: torch.Tensor, absmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round to nearest, symmetric: w [N, K] float -> (int8 [N, K], scale [N, 1], offset [N, 1] zeros).
    `absmax` [N, 1]: the rows' largest magnitudes when w holds only part of each row (a row-parallel
    shard), so every rank quantizes as the whole model does."""
    w = w.float()
    scale = (w.abs().amax(-1, keepdim=True) if absmax is None else absmax).clamp(min=1e-8) / 127.0
    return torch.round(w / scale).clamp(-128, 127).to(torch.int8), scale, torch.zeros_like(scale)


class W8A16Method(QuantMethod):
    supports_from_float = True

    def create_weights(self, layer: LinearBase, bias: bool) -> None:
        n, k = layer.output_size, layer.input_size
        if self.from_float:  # quantized once loaded (--quantize w8a16)
            layer.add_param("weight", (n, k))
        else:
            layer.add_param("weight", (n, k), torch.int8)
            layer.add_param("weight_scale", (n, 1), torch.float32)
            layer.add_param("weight_offset", (n, 1), torch.float32)
        if bias:
            layer.add_param("bias", (n,))

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        if self.from_float:
            q, scale, offset = quantize_w8_per_channel(layer.weight.data, getattr(layer, "whole_row_absmax", None))
            layer.weight.data = q
            layer.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
            layer.weight_offset = torch.nn.Parameter(offset, requires_grad=False)
        scale = layer.weight_scale.data.flatten()
        offset = constant_zero_groups(scale, layer.weight_offset.data.flatten())
        layer.scales = scale.to(layer.dtype)
        # W x = s * (q x) - s * o * sum(x): the offset term only where offsets are not all zero
        layer.zero_term = (scale * offset).to(layer.dtype) if offset.any() else None
        layer.scales16 = scale.bfloat16() if self.dense_fp32(layer) else None  # fp32 models' decode products
        layer.gpu = self.gpu_kernels(layer)
        if layer.gpu:  # W = q * scale + zero, dequantized inside the kernel
            scale = scale.float()[:, None].contiguous()
            layer.gemm_scale_zero = (scale, -scale * offset.float()[:, None])

    def dequantize(self, layer: LinearBase) -> torch.Tensor:
        w = layer.weight.float() * layer.scales[:, None]
        return w if layer.zero_term is None else w - layer.zero_term[:, None]

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        if layer.gpu:
            from atb_llm.quantization.triton_gemm import wq_matmul  # triton only where it runs

            y = wq_matmul(x.reshape(-1, layer.input_size), layer.weight, *layer.gemm_scale_zero, layer.bias)
            return y.view(*x.shape[:-1], layer.output_size)
        x2 = x.reshape(-1, layer.input_size)
        if self.dense_fp32(layer):
            if x2.shape[0] > DECODE_ROWS:
                return torch.nn.functional.linear(x, self.dequantize(layer), layer.bias)
            y = torch._weight_int8pack_mm(x2.bfloat16(), layer.weight, layer.scales16).float()
        else:
            y = torch._weight_int8pack_mm(x2, layer.weight, layer.scales)
        if layer.zero_term is not None:
            y = y - x2.sum(-1, keepdim=True) * layer.zero_term
        if layer.bias is not None:
            y = y + layer.bias
        return y.view(*x.shape[:-1], layer.output_size)
