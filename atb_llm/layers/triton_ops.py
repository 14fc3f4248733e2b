"""Fused elementwise kernels of the GPU path: residual add + RMSNorm, and RoPE over q and k.

Each replaces a chain of torch operations (eight launches for a norm, twelve for RoPE of q and k)
with one launch. In decode, RoPE runs inside the cache-write kernel instead (triton_kernels), so
`rotary` serves prefill. They round where the torch code rounds (the residual sum, the normalised
value and the RoPE products in the model dtype), so they give the torch results up to the last bit
of a 16-bit value. They run on CUDA, and on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1), where the tests compare them with the torch code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def add_rms_norm_kernel(
    x_ptr,  # [T, H]
    r_ptr,  # [T, H] the residual, read when HAS_RES
    w_ptr,  # [H]
    out_ptr,  # [T, H] norm(x + r) * w
    sum_ptr,  # [T, H] x + r, written when HAS_RES
    H,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * H
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        x = (x + tl.load(r_ptr + row + cols, mask=ok, other=0.0).to(tl.float32)).to(dtype)
        tl.store(sum_ptr + row + cols, x, mask=ok)
        x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / H + eps)
    n = (x * rstd).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row + cols, (w * n).to(dtype), mask=ok)


def add_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """As RMSNorm.forward: norm(x) * weight, or with `residual` (norm(x + residual) * weight, x + residual)."""
    x = x.contiguous()
    t, h = x.shape
    out = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else out
    add_rms_norm_kernel[(t,)](
        x, residual.contiguous() if residual is not None else x, weight, out, total, h, eps,
        HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(h), num_warps=4 if h <= 4096 else 8,
    )  # fmt: skip
    return out if residual is None else (out, total)


@triton.jit
def rotate_values(x, partner, sign, c, s, DT: tl.constexpr):
    """RoPE of values `x` given each one's rotary partner (x[d + D/2] or x[d - D/2]), its sign (-1 in
    the first half) and cos / sin: x * cos + rotate_half(x) * sin, each product and the sum rounded
    to the model dtype DT as torch rounds them; fp32 out."""
    a = (x * c).to(DT).to(tl.float32)
    b = (sign * partner * s).to(DT).to(tl.float32)
    return (a + b).to(DT).to(tl.float32)


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, t, stride_xt, stride_xh, HEADS, c1, c2, s1, s2, HALF: tl.constexpr, BLOCK_H: tl.constexpr
):
    """RoPE of token t's HEADS heads of x (rows and heads strided) into out [T, HEADS, 2 * HALF]."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    ok = h < HEADS
    dtype = out_ptr.dtype.element_ty
    src = x_ptr + t * stride_xt + h * stride_xh + d
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
    dst = out_ptr + t * HEADS * 2 * HALF + h * 2 * HALF + d
    tl.store(dst, rotate_values(x1, x2, -1.0, c1, s1, dtype).to(dtype), mask=ok)
    tl.store(dst + HALF, rotate_values(x2, x1, 1.0, c2, s2, dtype).to(dtype), mask=ok)


@triton.jit
def rotary_kernel(
    q_ptr,  # [T, HQ, 2 * HALF], rows and heads strided
    k_ptr,  # [T, HK, 2 * HALF], rows and heads strided
    cos_ptr,  # [T, 2 * HALF] contiguous
    sin_ptr,
    qo_ptr,  # [T, HQ, 2 * HALF] contiguous
    ko_ptr,  # [T, HK, 2 * HALF] contiguous
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    HQ,
    HK,
    HALF: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program per token: its query and key heads."""
    t = tl.program_id(0).to(tl.int64)
    table = t * 2 * HALF + tl.arange(0, HALF)[None, :]
    c1, c2 = tl.load(cos_ptr + table).to(tl.float32), tl.load(cos_ptr + table + HALF).to(tl.float32)
    s1, s2 = tl.load(sin_ptr + table).to(tl.float32), tl.load(sin_ptr + table + HALF).to(tl.float32)
    _rotate_heads(q_ptr, qo_ptr, t, stride_qt, stride_qh, HQ, c1, c2, s1, s2, HALF, BLOCK_Q)
    _rotate_heads(k_ptr, ko_ptr, t, stride_kt, stride_kh, HK, c1, c2, s1, s2, HALF, BLOCK_K)


def rotary(
    rope: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """As apply_rotary, in one launch: rope = (cos, sin) [T, 1, D] in q's dtype; q [T, Hq, D] and
    k [T, Hkv, D] with unit stride along D (views into the fused qkv output are fine) -> rotated
    q and k, contiguous."""
    cos, sin = (c.contiguous() for c in rope)
    q, k = (x if x.stride(2) == 1 else x.contiguous() for x in (q, k))
    (t, hq, d), hk = q.shape, k.shape[1]
    q_out = torch.empty(t, hq, d, dtype=q.dtype, device=q.device)
    k_out = torch.empty(t, hk, d, dtype=k.dtype, device=k.device)
    rotary_kernel[(t,)](
        q, k, cos, sin, q_out, k_out, q.stride(0), q.stride(1), k.stride(0), k.stride(1), hq, hk, HALF=d // 2,
        BLOCK_Q=triton.next_power_of_2(hq), BLOCK_K=triton.next_power_of_2(hk),
    )  # fmt: skip
    return q_out, k_out
