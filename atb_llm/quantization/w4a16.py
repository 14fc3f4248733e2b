"""W4A16: int4 weights, asymmetric, with a scale and offset per group of input channels.

Checkpoint (msModelSlim): two signed int4 values (-8..7) per int8 byte, low nibble first. Per
group (`group_size` > 0): weight [N/2, K] packed along the output dimension (rows 2i, 2i+1),
scale and offset [N, K/group_size]. Per channel (`group_size` 0): weight [N, K/2] packed along
the input dimension, scale and offset [N, 1]. W = (q - offset) * scale.

On CPU the weight is repacked once for torch's int4 kernel (`_weight_int4pack_mm_for_cpu`), which
computes with W = (u - 8) * scale + zero for u = q + 8 in 0..15, so zero = -offset * scale.
That kernel is fast for bf16/fp16 activations only: fp32 models give it bf16 activations (the
format's A16). Dequantizing per call instead would keep fp32 activations but costs the whole
weight at every decode step (1387 ms per token against 165 ms for the fp32 weights on the default
model, AVX2); keeping an unpacked copy for prefill would double the int4 bytes. On CUDA the
nibbles go to the Triton kernel of `triton_gemm`, which unpacks and dequantizes them in registers
(group size 128: one step of 64 input channels never straddles two groups).
"""

from __future__ import annotations

import torch

from atb_llm.layers.linear import LinearBase
from atb_llm.quantization.base import QuantMethod, constant_zero_groups

KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes the CPU int4 kernel takes


def unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int8 bytes holding two signed int4 (low nibble first) -> int8 values -8..7, `dim` doubled."""
    lo, hi = (packed << 4) >> 4, packed >> 4  # arithmetic shifts of int8 sign-extend each nibble
    return torch.stack([lo, hi], dim + 1).flatten(dim, dim + 1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values q [N, K] (int8, -8..7) -> [N, K/2] bytes, input channels 2j / 2j+1 in the low / high nibble."""
    return ((q[:, 0::2] & 0xF) | (q[:, 1::2] << 4)).contiguous()


def quantize_w4_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round to nearest, asymmetric per group: w [N, K] -> (int4 values int8 [N, K], scale, offset [N, K/g])."""
    n, k = w.shape
    wg = w.float().view(n, k // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    offset = torch.round(-8 - lo / scale)
    q = torch.round(wg / scale[..., None] + offset[..., None]).clamp(-8, 7)
    return q.view(n, k).to(torch.int8), scale, offset


def kernel_group(k: int, group_size: int) -> int:
    """The kernel's group: the checkpoint's, or for per-channel scales the largest that divides K."""
    if group_size:
        return group_size
    for g in KERNEL_GROUPS:
        if k % g == 0:
            return g
    raise ValueError(f"W4A16 needs in_features={k} divisible by one of {KERNEL_GROUPS}")


class W4A16Method(QuantMethod):
    supports_from_float = True

    def create_weights(self, layer: LinearBase, bias: bool) -> None:
        n, k, g = layer.output_size, layer.input_size, self.group_size
        if g and k % g:
            raise ValueError(f"W4A16 group_size={g} does not divide in_features={k}")
        if self.from_float:  # quantized once loaded (--quantize w4a16)
            layer.add_param("weight", (n, k))
        elif g:
            layer.add_param("weight", (n // 2, k), torch.int8, pack=2)
            layer.add_param("weight_scale", (n, k // g), torch.float32)
            layer.add_param("weight_offset", (n, k // g), torch.float32)
        else:
            layer.add_param("weight", (n, k // 2), torch.int8)
            layer.add_param("weight_scale", (n, 1), torch.float32)
            layer.add_param("weight_offset", (n, 1), torch.float32)
        if bias:
            layer.add_param("bias", (n,))

    def int4_values(self, layer: LinearBase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q [N, K] int4 values, scale, offset [N, K/g]) of the loaded layer."""
        if self.from_float:
            return quantize_w4_groups(layer.weight.data, self.group_size)
        q = unpack_int4(layer.weight.data, 0 if self.group_size else 1)
        return q, layer.weight_scale.data, constant_zero_groups(layer.weight_scale.data, layer.weight_offset.data)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        q, scale, offset = self.int4_values(layer)
        n, k = q.shape
        g = kernel_group(k, self.group_size)
        if scale.shape[1] != k // g:  # per-channel scales: the same value in each of the kernel's groups
            scale, offset = scale.expand(n, k // g), offset.expand(n, k // g)
        scale, offset = scale.float(), offset.float()
        layer.group = g
        zero = -offset * scale
        layer.gpu = self.gpu_kernels(layer)  # decided before the weight goes
        if layer.gpu:
            layer.nibbles = pack_int4(q)  # [N, K/2], low nibble first
            layer.scale_zero = (scale.contiguous(), zero.contiguous())  # [N, K/g] each
        else:
            layer.packed = torch._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)
            act = torch.bfloat16 if layer.dtype == torch.float32 else layer.dtype  # fp32 models: A16 in bf16
            layer.scales_and_zeros = torch.stack([scale.T, zero.T], -1).contiguous().to(act)  # [K/g, N, 2]
        layer.weight.data = layer.weight.data.new_empty(0)  # one copy in memory: the packed one
        for name in ("weight_scale", "weight_offset"):
            if hasattr(layer, name):
                delattr(layer, name)

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        if layer.gpu:
            from atb_llm.quantization.triton_gemm import wq_matmul  # triton only where it runs

            x2 = x.reshape(-1, layer.input_size)
            y = wq_matmul(x2, layer.nibbles, *layer.scale_zero, layer.bias, layer.group, int4=True)
            return y.view(*x.shape[:-1], layer.output_size)
        x2 = x.reshape(-1, layer.input_size).to(layer.scales_and_zeros.dtype)
        y = torch._weight_int4pack_mm_for_cpu(x2, layer.packed, layer.group, layer.scales_and_zeros).to(x.dtype)
        if layer.bias is not None:
            y = y + layer.bias
        return y.view(*x.shape[:-1], layer.output_size)
