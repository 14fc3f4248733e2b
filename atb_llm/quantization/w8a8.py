"""W8A8 (static, per-tensor activations) and W8A8_DYNAMIC (per-token activations): int8 weights
with a scale per output channel, activations quantized to int8, products in an int8 GEMM.

W8A8 checkpoint: weight int8 [N, K]; input_scale, input_offset [1] (one pair per fused linear);
quant_bias int32 [N] (it already holds the float bias: the stored `bias` is not added again);
deq_scale [N] (fp32, or int64 holding the fp32 bit pattern for fp16/fp32 models).
    x_q = clamp(round(x / input_scale) + input_offset, -128, 127);  y = (x_q q^T + quant_bias) * deq_scale
W8A8S checkpoint (sparse quantization): W8A8's tensors without weight_scale / weight_offset; the
int8 weights hold 4-bit values but outliers, some pruned to 0. On the GPU path they are stored as
int4 plus sparse outliers (`dense_sparse`), with the same products.
W8A8_DYNAMIC checkpoint: weight int8 [N, K], weight_scale [N, 1], float bias; per token t,
    s_t = max|x_t| / 127;  y = (round(x / s_t) q^T) * s_t * weight_scale + bias

The int8 GEMM is oneDNN's (`onednn.qlinear_pointwise`, u8 activations). CPUs without VNNI
multiply u8 x s8 pairs into saturating int16 sums, which loses precision for activations above
127; where a probe at load finds that, the activation u = x_q + 128 is split as 2 * (u >> 1) +
(u & 1) over two exact GEMMs. The int32 sums come back in fp32 and are scaled here. On CUDA the
GEMM is torch._int_mm (cuBLAS int8).
"""

from __future__ import annotations

import functools

import torch

from atb_llm.layers.linear import LinearBase
from atb_llm.quantization.base import QuantMethod
from atb_llm.quantization.dense_sparse import DenseSparse


def deq_scale_as_float(t: torch.Tensor) -> torch.Tensor:
    """msModelSlim stores deq_scale of fp16/fp32 models as int64 holding the fp32 bits."""
    return t.to(torch.int32).view(torch.float32) if t.dtype == torch.int64 else t.float()


def _u8_gemm(u: torch.Tensor, packed: torch.Tensor, ones: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """u [M, K] uint8, packed int8 weight [N, K], unit scales and zero points [N] -> fp32 u @ q^T."""
    f32 = torch.float32  # the op's fp32 output path: bf16 / fp16 outputs run a reference kernel, 300x slower
    return torch.ops.onednn.qlinear_pointwise(u, 1.0, 0, packed, ones, zeros, None, 1.0, 0, f32, "none", [], "")


@functools.cache
def u8_gemm_is_exact() -> bool:
    """Whether oneDNN sums u8 x s8 products without int16 saturation here (VNNI, AMX)."""
    u = torch.full((1, 64), 255, dtype=torch.uint8)
    q = torch.full((8, 64), 127, dtype=torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(q, [1, 64])
    return bool(_u8_gemm(u, packed, torch.ones(8), torch.zeros(8, dtype=torch.int64))[0, 0] == 64 * 255 * 127)


class Int8Gemm:
    """x_q q^T for int8 activations x_q [M, K] (values -128..127) and int8 weights q [N, K], in fp32."""

    def __init__(self, q: torch.Tensor):
        self.ones, self.zeros = torch.ones(q.shape[0]), torch.zeros(q.shape[0], dtype=torch.int64)
        self.packed = torch.ops.onednn.qlinear_prepack(q, [1, q.shape[1]])
        self.shift = 128 * q.float().sum(1)  # u = x_q + 128 adds 128 * rowsum(q)

    def __call__(self, xq: torch.Tensor) -> torch.Tensor:
        u = (xq + 128).to(torch.uint8)
        if u8_gemm_is_exact():
            acc = _u8_gemm(u, self.packed, self.ones, self.zeros)
        else:
            hi, lo = (_u8_gemm(v, self.packed, self.ones, self.zeros) for v in (u >> 1, u & 1))
            acc = hi.mul_(2).add_(lo)
        return acc.sub_(self.shift)


class IntMM:
    """The same product with torch._int_mm (cuBLAS int8 on CUDA, which takes more than 16 rows:
    decode batches are padded to 17)."""

    def __init__(self, q: torch.Tensor):
        self.qt = q.t()  # [K, N] column-major, as cuBLAS wants the second operand

    def __call__(self, xq: torch.Tensor) -> torch.Tensor:
        m = xq.shape[0]
        x8 = xq.to(torch.int8)
        if m <= 16:
            x8 = torch.cat([x8, x8.new_zeros(17 - m, x8.shape[1])])
        return torch._int_mm(x8, self.qt)[:m].float()


def int8_gemm(method: QuantMethod, layer: LinearBase) -> Int8Gemm | IntMM:
    return IntMM(layer.weight.data) if method.gpu_kernels(layer) else Int8Gemm(layer.weight.data)


def _check_symmetric(layer: LinearBase) -> None:
    if layer.weight_offset.data.any():
        raise ValueError(
            "W8A8 weights with non-zero weight_offset are not supported; export with symmetric weights "
            "(msModelSlim's default, w_sym=True)"
        )


class W8A8Method(QuantMethod):
    weight_scales = True  # W8A8 checkpoints also carry weight_scale / weight_offset (checked symmetric)

    def create_weights(self, layer: LinearBase, bias: bool) -> None:
        n, k = layer.output_size, layer.input_size
        layer.add_param("weight", (n, k), torch.int8)
        if self.weight_scales:
            layer.add_param("weight_scale", (n, 1), torch.float32)
            layer.add_param("weight_offset", (n, 1), torch.float32)
        layer.add_param("input_scale", (1,), torch.float32, shared=True)
        layer.add_param("input_offset", (1,), torch.float32, shared=True)
        layer.add_param("quant_bias", (n,), torch.int32)
        deq = layer.add_param("deq_scale", (n,), torch.float32)
        deq.weight_loader = lambda p, t, name, shard_id=None: layer.weight_loader(
            p, deq_scale_as_float(t), name, shard_id
        )
        if bias:  # in the checkpoint, already folded into quant_bias
            layer.add_param("bias", (n,))

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        if self.weight_scales:
            _check_symmetric(layer)
        layer.gemm = int8_gemm(self, layer)
        layer.weight.data = layer.weight.data.new_empty(0)  # one copy in memory: the packed one
        layer.deq = layer.deq_scale.data.float()
        layer.gemm_bias = layer.quant_bias.data.float() * layer.deq
        layer.in_scale, layer.in_offset = float(layer.input_scale), float(layer.input_offset)

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, layer.input_size)
        xq = torch.clamp(torch.round(x2.float() / layer.in_scale) + layer.in_offset, -128, 127)
        y = torch.addcmul(layer.gemm_bias, layer.gemm(xq.to(torch.int16)), layer.deq)
        return y.to(x.dtype).view(*x.shape[:-1], layer.output_size)


class W8A8SMethod(W8A8Method):
    """W8A8S (sparse quantization): W8A8's static per-tensor activations and int8 GEMM; the weights
    hold 4-bit values but outliers (some pruned to 0), and the checkpoint has no weight_scale."""

    weight_scales = False

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        split = DenseSparse.split(layer.weight.data) if self.gpu_kernels(layer) else None
        super().process_weights_after_loading(layer)
        if split is not None:  # the GPU path reads half the bytes; the CPU keeps the int8 GEMM (see dense_sparse)
            layer.gemm = split


class W8A8DynamicMethod(QuantMethod):
    def create_weights(self, layer: LinearBase, bias: bool) -> None:
        n, k = layer.output_size, layer.input_size
        layer.add_param("weight", (n, k), torch.int8)
        layer.add_param("weight_scale", (n, 1), torch.float32)
        layer.add_param("weight_offset", (n, 1), torch.float32)
        if bias:
            layer.add_param("bias", (n,))

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        _check_symmetric(layer)
        layer.gemm = int8_gemm(self, layer)
        layer.weight.data = layer.weight.data.new_empty(0)
        layer.w_scale = layer.weight_scale.data.flatten().float()

    def apply(self, layer: LinearBase, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, layer.input_size).float()
        s = x2.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127.0  # [M, 1] per token
        xq = torch.round(x2 / s).clamp(-127, 127)
        y = layer.gemm(xq.to(torch.int16)) * s * layer.w_scale
        if layer.bias is not None:
            y = y + layer.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], layer.output_size)
