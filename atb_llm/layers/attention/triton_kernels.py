"""Triton kernels of the MLGC cache: paged decode over per-group block tables, and the cache write.

Decode runs one program per (sequence, KV head of a run, split of the context). A program loads
all query heads of its group as one tile of GQ_PAD rows (padded to a power of two, at least 16
for tl.dot), then walks the group's logical slots TILE at a time (a power of two dividing
block_size, so a tile never straddles two blocks; one scalar block-table load per tile): each K/V
tile is read once for all the group's query heads.
Softmax is online, in base 2. When the batch alone does not fill the GPU, the context is split
across programs and a second kernel combines the partial results (flash-decoding).

The cache write runs one program per (token, KV head of a run); in decode it also applies RoPE,
to the key on its way into the cache and to the group's query heads, so a decode step's q/k
rotation, K/V write, int8 quantization and window fold are one launch per run.

Every value is converted to fp32 right after it is loaded; dots use TF32 tensor cores for 16-bit
models (bf16 and fp16 values and int8 codes are exact in TF32) and IEEE fp32 for fp32 models.
Triton's CPU interpreter has no bf16 arithmetic, so this also lets the kernels run there.
"""

from __future__ import annotations

import triton
import triton.language as tl

from atb_llm.layers.triton_ops import rotate_values

# Adding then subtracting 1.5 * 2**23 rounds an fp32 |x| < 2**22 to the nearest integer, ties to
# even (as torch.round), in plain IEEE arithmetic on every target, the CPU interpreter included.
_RINT_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def decode_kernel(
    q_ptr,  # [B, Hq, D]
    out_ptr,  # [B, Hq, D], written when not SPLIT
    k_ptr,  # [num_blocks, BLOCK_SIZE, D] model dtype or int8
    v_ptr,
    ks_ptr,  # [num_blocks, BLOCK_SIZE] fp32 per-token scales (INT8 only)
    vs_ptr,
    tables_ptr,  # [G, B, max_blocks] int64
    groups_ptr,  # [h] global group ids of the run
    read_len_ptr,  # [B] int32 slots to read from slot 0
    evicted_ptr,  # [B] int32 tokens folded into the compensation slot (HAS_COMP only)
    m_ptr,  # [B, Hq, S] fp32 running max (base 2), written when SPLIT
    l_ptr,  # [B, Hq, S] fp32 softmax denominators
    acc_ptr,  # [B, Hq, S, D] fp32 unnormalized outputs
    group_base,  # layer * num_kv_heads: group id -> KV head index
    comp_slot,
    qk_scale,  # softmax scale * log2(e)
    tiles_per_split,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_tg,
    stride_tb,
    stride_mb,
    stride_mh,
    GQ: tl.constexpr,
    GQ_PAD: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    INT8: tl.constexpr,
    HAS_COMP: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    s = tl.program_id(2)
    g = tl.load(groups_ptr + tl.program_id(1))
    rows = tl.arange(0, GQ_PAD)
    dims = tl.arange(0, D_PAD)
    offs = tl.arange(0, TILE)
    qh = (g - group_base) * GQ + rows  # the query heads of this group
    row_ok = rows < GQ
    dim_ok = dims < D
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(q_ptr + b * stride_qb + qh[:, None] * stride_qh + dims[None, :], mask=q_mask, other=0.0)
    q = q.to(tl.float32) * qk_scale

    n = tl.load(read_len_ptr + b)
    n_tiles = tl.cdiv(n, TILE)
    t_start = s * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, n_tiles)
    t_end = tl.where(s == tl.num_programs(2) - 1, n_tiles, t_end)  # the last split takes any rest
    comp_bias = 0.0
    if HAS_COMP:  # log(evicted) in base 2; -inf masks the slot while nothing is evicted
        e = tl.load(evicted_ptr + b).to(tl.float32)
        comp_bias = tl.where(e > 0, tl.log2(tl.maximum(e, 1.0)), float("-inf"))

    m_i = tl.full([GQ_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GQ_PAD], tl.float32)
    acc = tl.zeros([GQ_PAD, D_PAD], tl.float32)
    table = tables_ptr + g * stride_tg + b * stride_tb
    for t in range(t_start, t_end):
        slot = t * TILE + offs
        ok = slot < n
        blk = tl.load(table + (t * TILE) // BLOCK_SIZE)
        row = (t * TILE) % BLOCK_SIZE + offs
        kv_off = blk * stride_kb + row[:, None] * stride_kt + dims[None, :]
        kv_mask = ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0).to(tl.float32)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0).to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [GQ_PAD, TILE]
        if INT8:  # int8 codes are exact in the dot; the per-token scale multiplies the logit
            qk = qk * tl.load(ks_ptr + blk * BLOCK_SIZE + row, mask=ok, other=0.0)[None, :]
        if HAS_COMP:
            qk = qk + tl.where(slot == comp_slot, comp_bias, 0.0)[None, :]
        qk = tl.where(ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked tile adds nothing
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if INT8:  # ... and the value scale multiplies the probability
            p = p * tl.load(vs_ptr + blk * BLOCK_SIZE + row, mask=ok, other=0.0)[None, :]
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new

    if SPLIT:
        mo = b * stride_mb + qh * stride_mh + s
        tl.store(m_ptr + mo, m_i, mask=row_ok)
        tl.store(l_ptr + mo, l_i, mask=row_ok)
        tl.store(acc_ptr + mo[:, None] * D + dims[None, :], acc, mask=q_mask)
    else:
        o = acc / l_i[:, None]
        o_ptr = out_ptr + b * stride_ob + qh[:, None] * stride_oh + dims[None, :]
        tl.store(o_ptr, o.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def combine_kernel(
    out_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    groups_ptr,
    group_base,
    num_splits,
    stride_ob,
    stride_oh,
    stride_mb,
    stride_mh,
    GQ: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    S_PAD: tl.constexpr,
):
    """One program per (sequence, query head of the run): merges the splits' partial softmaxes."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    g = tl.load(groups_ptr + j // GQ)
    qh = (g - group_base) * GQ + j % GQ
    splits = tl.arange(0, S_PAD)
    dims = tl.arange(0, D_PAD)
    s_ok = splits < num_splits
    dim_ok = dims < D
    mo = b * stride_mb + qh * stride_mh + splits
    m = tl.load(m_ptr + mo, mask=s_ok, other=float("-inf"))
    l_s = tl.load(l_ptr + mo, mask=s_ok, other=0.0)
    acc = tl.load(acc_ptr + mo[:, None] * D + dims[None, :], mask=s_ok[:, None] & dim_ok[None, :], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty splits weigh 0
    o = tl.sum(acc * w[:, None], 0) / tl.sum(l_s * w, 0)
    tl.store(out_ptr + b * stride_ob + qh * stride_oh + dims, o.to(out_ptr.dtype.element_ty), mask=dim_ok)


@triton.jit
def _row_mask(ok, D: tl.constexpr, D_PAD: tl.constexpr):
    """[D_PAD] mask of a row's D values, all false unless the scalar `ok` (written as a compare:
    Triton's interpreter mistypes a scalar-and-tensor `&`)."""
    return tl.arange(0, D_PAD) < tl.where(ok, D, 0)


@triton.jit
def _load_row(data_ptr, scale_ptr, slot, ok, D: tl.constexpr, D_PAD: tl.constexpr, INT8: tl.constexpr):
    """Row `slot` of a pool as fp32 [D_PAD] (dequantized for int8 pools); zeros unless `ok`."""
    dims = tl.arange(0, D_PAD)
    x = tl.load(data_ptr + slot * D + dims, mask=_row_mask(ok, D, D_PAD), other=0).to(tl.float32)
    if INT8:
        x = x * tl.load(scale_ptr + slot, mask=ok, other=0.0)
    return x


@triton.jit
def _store_row(data_ptr, scale_ptr, slot, x, ok, D: tl.constexpr, D_PAD: tl.constexpr, INT8: tl.constexpr):
    """Writes fp32 `x` [D_PAD] into row `slot` if `ok`; int8 pools get symmetric per-token
    quantization, as `Storage.quantize` (IEEE division, not the approximate default, so the codes
    and scales are the reference's)."""
    dims = tl.arange(0, D_PAD)
    mask = _row_mask(ok, D, D_PAD)
    if INT8:
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(tl.where(mask, x, 0.0)), 0), 1e-8), 127.0)
        code = (tl.math.div_rn(x, scale) + _RINT_MAGIC) - _RINT_MAGIC
        code = tl.minimum(tl.maximum(code, -127.0), 127.0)
        tl.store(data_ptr + slot * D + dims, code.to(tl.int8), mask=mask)
        tl.store(scale_ptr + slot, scale, mask=ok)
    else:
        tl.store(data_ptr + slot * D + dims, x.to(data_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_kernel(
    k_ptr,  # [T, Hkv, D] new keys (before RoPE when ROPE)
    v_ptr,
    kc_ptr,  # [num_blocks, BLOCK_SIZE, D] pool
    vc_ptr,
    ks_ptr,  # [num_blocks, BLOCK_SIZE] fp32 scales (INT8 only)
    vs_ptr,
    slots_ptr,  # [G, T] int64 flat slots, -1 = not kept
    groups_ptr,  # [h]
    tables_ptr,  # [G, B, max_blocks] (COMP only)
    evicted_ptr,  # [B] int32 evicted after this step (COMP only)
    q_ptr,  # [T, Hq, D] queries before RoPE (ROPE only)
    qo_ptr,  # [T, Hq, D] contiguous: the rotated queries (ROPE only)
    cos_ptr,  # [T, D] contiguous (ROPE only)
    sin_ptr,
    group_base,
    comp_slot,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_sg,
    stride_tg,
    stride_tb,
    stride_qt,
    stride_qh,
    stride_qot,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    INT8: tl.constexpr,
    COMP: tl.constexpr,
    ROPE: tl.constexpr,
    GQ: tl.constexpr,
    GQ_PAD: tl.constexpr,
):
    """One program per (token, KV head of the run). With COMP (decode: token t is sequence t), a
    window group first folds the token leaving its ring, the one in the slot about to be
    overwritten, into the running mean held in the compensation slot. With ROPE (decode) the
    program also applies RoPE: to its key before the write, and to its group's GQ query heads,
    written to qo (a run's launch rotates the query heads of its groups; the runs of a layer
    cover them all)."""
    t = tl.program_id(0)
    g = tl.load(groups_ptr + tl.program_id(1))
    head = g - group_base
    slot = tl.load(slots_ptr + g * stride_sg + t)
    keep = slot >= 0
    if COMP:
        e = tl.load(evicted_ptr + t)
        fold = keep & (e > 0)  # a short sequence's table may not reach the compensation slot's block
        blk = tl.load(tables_ptr + g * stride_tg + t * stride_tb + comp_slot // BLOCK_SIZE, mask=fold, other=0)
        dst = blk * BLOCK_SIZE + comp_slot % BLOCK_SIZE
        ef = tl.maximum(e, 1).to(tl.float32)
        old_k = _load_row(kc_ptr, ks_ptr, slot, fold, D, D_PAD, INT8)
        old_v = _load_row(vc_ptr, vs_ptr, slot, fold, D, D_PAD, INT8)
        ck = _load_row(kc_ptr, ks_ptr, dst, fold, D, D_PAD, INT8)
        cv = _load_row(vc_ptr, vs_ptr, dst, fold, D, D_PAD, INT8)
        ck = tl.where(e == 1, old_k, ck + tl.math.div_rn(old_k - ck, ef))  # the first evicted token replaces the slot
        cv = tl.where(e == 1, old_v, cv + tl.math.div_rn(old_v - cv, ef))
        _store_row(kc_ptr, ks_ptr, dst, ck, fold, D, D_PAD, INT8)
        _store_row(vc_ptr, vs_ptr, dst, cv, fold, D, D_PAD, INT8)
        tl.debug_barrier()  # the old row is read by every thread before the new token replaces it
    dims = tl.arange(0, D_PAD)
    mask = _row_mask(keep, D, D_PAD)
    k_row = k_ptr + t * stride_kt + head * stride_kh
    k = tl.load(k_row + dims, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + t * stride_vt + head * stride_vh + dims, mask=mask, other=0.0).to(tl.float32)
    if ROPE:
        DT: tl.constexpr = q_ptr.dtype.element_ty
        first = dims < D // 2
        partner = tl.where(first, dims + D // 2, dims - D // 2)
        sign = tl.where(first, -1.0, 1.0)
        dim_ok = dims < D
        c = tl.load(cos_ptr + t * D + dims, mask=dim_ok, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + t * D + dims, mask=dim_ok, other=0.0).to(tl.float32)
        k = rotate_values(k, tl.load(k_row + partner, mask=mask, other=0.0).to(tl.float32), sign, c, s, DT)
        rows = tl.arange(0, GQ_PAD)
        qh = head * GQ + rows
        q_mask = (rows < GQ)[:, None] & dim_ok[None, :]
        q_row = q_ptr + t * stride_qt + qh[:, None] * stride_qh
        x = tl.load(q_row + dims[None, :], mask=q_mask, other=0.0).to(tl.float32)
        xp = tl.load(q_row + partner[None, :], mask=q_mask, other=0.0).to(tl.float32)
        qr = rotate_values(x, xp, sign[None, :], c[None, :], s[None, :], DT)
        tl.store(qo_ptr + t * stride_qot + qh[:, None] * D + dims[None, :], qr, mask=q_mask)
    _store_row(kc_ptr, ks_ptr, slot, k, keep, D, D_PAD, INT8)
    _store_row(vc_ptr, vs_ptr, slot, v, keep, D, D_PAD, INT8)
