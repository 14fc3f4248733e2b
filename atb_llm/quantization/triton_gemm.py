"""Weight-only quantized GEMM on the GPU: int8 or int4 weights dequantized inside a Triton kernel.

    y = x W^T + bias,  W = q * scale + zero   (scale and zero per output channel and group of
                                               input channels; zero = -offset * scale)

W8A16: q int8 [N, K], one group of K. W4A16: q as nibbles [N, K/2] (input channels 2j and 2j+1 in
the low and high nibble of byte j, signed -8..7), groups of `group` input channels. A program
computes a BLOCK_M x BLOCK_N tile of y: it walks K in steps of BLOCK_K (a step never straddles
two groups), loads the weight tile once as int8 (a quarter / an eighth of the bf16 bytes),
dequantizes it in registers and multiplies it with the activation tile. Decode (M <= 16) runs
one row of programs, so the weight is read once per step.

As in the attention kernels, every value becomes fp32 right after it is loaded and the dots use
TF32 for 16-bit models and IEEE fp32 for fp32 models, which also lets Triton's CPU interpreter
(TRITON_INTERPRET=1, no bf16 arithmetic) run the kernel in the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def wq_matmul_kernel(
    x_ptr,  # [M, K] model dtype
    w_ptr,  # int8: [N, K] (INT4 False) or nibbles [N, K/2] (INT4 True)
    s_ptr,  # [N, K / GROUP] fp32 scale
    z_ptr,  # [N, K / GROUP] fp32 zero (-offset * scale)
    b_ptr,  # [N] bias, read when HAS_BIAS
    y_ptr,  # [M, N] model dtype
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ym,
    GROUP: tl.constexpr,
    INT4: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = k0 // GROUP
        s = tl.load(s_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        z = tl.load(z_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        if INT4:
            kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # bytes of this step
            ok = kb < K // 2
            b = tl.load(w_ptr + rn[:, None] * stride_wn + kb[None, :], mask=n_ok[:, None] & ok[None, :], other=0)
            lo = ((b << 4).to(tl.int8) >> 4).to(tl.float32) * s + z  # channels 2j (sign-extended nibble)
            hi = (b >> 4).to(tl.float32) * s + z  # channels 2j + 1
            xm = m_ok[:, None] & ok[None, :]
            x_even = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * kb[None, :], mask=xm, other=0.0)
            x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * kb[None, :] + 1, mask=xm, other=0.0)
            acc += tl.dot(x_even.to(tl.float32), tl.trans(lo), input_precision=PRECISION)
            acc += tl.dot(x_odd.to(tl.float32), tl.trans(hi), input_precision=PRECISION)
        else:
            rk = k0 + tl.arange(0, BLOCK_K)
            ok = rk < K
            q = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=n_ok[:, None] & ok[None, :], other=0)
            w = q.to(tl.float32) * s + z
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & ok[None, :], other=0.0)
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def wq_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bias: torch.Tensor | None = None,
    group: int | None = None,
    int4: bool = False,
) -> torch.Tensor:
    """x [M, K] @ dequantized W^T (+ bias) -> [M, N] in x's dtype.

    w: int8 [N, K], or nibbles [N, K/2] when int4; scale, zero: fp32 [N, K / group] (group None:
    one group of K, i.e. per output channel)."""
    m, k = x.shape
    n = w.shape[0]
    group = group or k
    if k % group or scale.shape != (n, k // group) or zero.shape != scale.shape:
        raise ValueError(f"scale {tuple(scale.shape)} / zero {tuple(zero.shape)} do not fit [{n}, {k} / {group}]")
    if int4 and (w.shape[1] * 2 != k or group % 2):
        raise ValueError(f"int4 weight {tuple(w.shape)} does not hold {k} input channels two per byte")
    block_k = min(64, group) if int4 else 64  # int4: a step stays inside one group
    if int4 and group % block_k:
        raise ValueError(f"int4 group size {group} must be a multiple of {block_k}")
    block_m = 16 if m <= 16 else 64
    block_n = 64
    x = x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    wq_matmul_kernel[grid](
        x, w, scale, zero, bias if bias is not None else y, y, m, n, k,
        x.stride(0), w.stride(0), scale.stride(0), y.stride(0),
        GROUP=group, INT4=int4, HAS_BIAS=bias is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return y


@triton.jit
def int4_int8_matmul_kernel(
    x_ptr,  # [M, K] int8 activations
    w_ptr,  # [N, K/2] int8 nibbles (channels 2j, 2j + 1 in the low, high nibble of byte j)
    y_ptr,  # [M, N] int32
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        ok = kb < K // 2
        b = tl.load(w_ptr + rn[:, None] * stride_wn + kb[None, :], mask=n_ok[:, None] & ok[None, :], other=0)
        lo = (b << 4).to(tl.int8) >> 4
        hi = b >> 4
        xm = m_ok[:, None] & ok[None, :]
        x_even = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * kb[None, :], mask=xm, other=0)
        x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * kb[None, :] + 1, mask=xm, other=0)
        acc += tl.dot(x_even, tl.trans(lo), out_dtype=tl.int32)
        acc += tl.dot(x_odd, tl.trans(hi), out_dtype=tl.int32)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


def int4_int8_matmul(x: torch.Tensor, nibbles: torch.Tensor) -> torch.Tensor:
    """Exact int32 x d^T for int8 activations x [M, K] and int4 weights d packed as nibbles [N, K/2]:
    int8 dots with int32 sums, so the weight is read at half a byte per value."""
    m, k = x.shape
    n = nibbles.shape[0]
    if nibbles.shape[1] * 2 != k:
        raise ValueError(f"int4 weight {tuple(nibbles.shape)} does not hold {k} input channels two per byte")
    block_m = 16 if m <= 16 else 64
    y = torch.empty(m, n, dtype=torch.int32, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 64))
    int4_int8_matmul_kernel[grid](
        x.contiguous(), nibbles, y, m, n, k, k, nibbles.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64,
    )  # fmt: skip
    return y
