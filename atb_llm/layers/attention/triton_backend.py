"""NVIDIA backend: Triton kernels for decode and the cache write on the paged MLGC cache; prefill
runs SDPA per sequence, as the torch reference does.

Decode launches one kernel per run (the KV heads of a layer that share a level): each program
reads one group's kept slots once for all of the group's query heads, dequantizes int8 pools in
the kernel and biases the window compensation slot by log(n_evicted). The decode cache write
rotates q and k (RoPE) in the same launch. The kernels run on CUDA,
and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1), which is how the tests check
them against the torch reference.
"""

from __future__ import annotations

import math

import torch
import triton

from atb_llm.cache.kv_cache import KVCache, KVPool
from atb_llm.compression.layout import Run
from atb_llm.layers.attention import kv_write
from atb_llm.layers.attention.backend import AttentionBackend
from atb_llm.layers.attention.metadata import AttentionMetadata
from atb_llm.layers.attention.torch_backend import TorchBackend
from atb_llm.layers.attention.triton_kernels import combine_kernel, decode_kernel, store_kernel

MAX_SPLITS = 128


class TritonBackend(AttentionBackend):
    """split_slots: a decode program reads at least this many slots of a group before the
    context is split across more programs (flash-decoding); splitting happens only while the
    batch alone gives fewer than `programs` programs. programs: what a decode launch aims for;
    None = 4 per SM on CUDA, 1 elsewhere (no split)."""

    name = "triton"
    fused_rope = fused_norm = gpu_gemms = cuda_graphs = True

    def __init__(self, split_slots: int = 512, programs: int | None = None):
        if split_slots < 1:
            raise ValueError(f"split_slots={split_slots} must be at least 1")
        if programs is not None and programs < 1:
            raise ValueError(f"programs={programs} must be at least 1 (or None: from the GPU)")
        self.split_slots = split_slots
        self.programs = programs
        self._reference = TorchBackend()
        self._group_ids: dict = {}
        self._sm_count: dict = {}

    def prefill(self, q, k, v, kv_cache: KVCache, layer: int, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        return self._reference.prefill(q, k, v, kv_cache, layer, meta, scale)

    def decode(self, q, kv_cache: KVCache, layer: int, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        q = _rows_contiguous(q)
        hkv = kv_cache.layout.num_kv_heads
        out = torch.empty_like(q)
        for run in kv_cache.layout.runs(layer):
            read_len, evicted = meta.level_lengths(run.level)
            max_read = run.level.slots_used(meta.max_seq_len)
            splits = self._num_splits(max_read, q.shape[0] * len(run.heads), q.device)
            paged_decode(
                q,
                out,
                kv_cache.pools[run.pool],
                meta.block_tables,
                self._groups(run, q.device),
                layer * hkv,
                hkv,
                read_len,
                evicted,
                run.level.comp_slot,
                scale,
                max_read,
                splits,
            )
        return out

    def decode_store(self, q, k, v, rope, kv_cache: KVCache, layer: int, meta: AttentionMetadata) -> torch.Tensor:
        """RoPE fused with the cache write: one launch per run rotates the run's keys, writes them and
        the values, and rotates the query heads of its groups."""
        if rope is None or meta.spec is not None:  # a verify step writes depth by depth: the reference store
            return super().decode_store(q, k, v, rope, kv_cache, layer, meta)
        q_rot = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        cos, sin = (c.reshape(q.shape[0], -1) for c in rope)  # [B, 1, D] -> [B, D]
        self.store(kv_cache, layer, k, v, meta, (_rows_contiguous(q), q_rot, cos, sin))
        return q_rot

    def store(self, kv_cache: KVCache, layer: int, k, v, meta: AttentionMetadata, rope=None) -> None:
        """rope (decode_store's): (q, q_out, cos, sin), k given before RoPE; see `store_kv`."""
        if meta.spec is not None:
            kv_write.store(kv_cache, layer, k, v, meta)
            return
        k, v = _rows_contiguous(k), _rows_contiguous(v)
        base = layer * kv_cache.layout.num_kv_heads
        for run in kv_cache.layout.runs(layer):
            pool, groups, comp = kv_cache.pools[run.pool], self._groups(run, k.device), run.level.comp_slot
            if comp is None:
                store_kv(pool, k, v, meta.slots, groups, base, rope=rope)
            elif meta.is_prefill:
                heads = list(run.heads)
                kv_write.fold_prefill(kv_cache, run, k[:, heads], v[:, heads], meta)
                store_kv(pool, k, v, meta.slots, groups, base)
            else:
                _, evicted = meta.level_lengths(run.level)
                store_kv(pool, k, v, meta.slots, groups, base, meta.block_tables, evicted, comp, rope)

    def _groups(self, run: Run, device: torch.device) -> torch.Tensor:
        """run.groups on `device`, copied once per run."""
        key = (id(run), device)
        hit = self._group_ids.get(key)
        if hit is None or hit[0] is not run:
            hit = self._group_ids[key] = (run, run.groups.to(device))
        return hit[1]

    def _num_splits(self, max_read: int, programs: int, device: torch.device) -> int:
        target = self.programs
        if target is None:
            target = 4 * self._sms(device) if device.type == "cuda" else 1
        want = math.ceil(max_read / self.split_slots)
        return max(1, min(want, math.ceil(target / programs), MAX_SPLITS))

    def _sms(self, device: torch.device) -> int:
        if device not in self._sm_count:
            self._sm_count[device] = torch.cuda.get_device_properties(device).multi_processor_count
        return self._sm_count[device]


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels index the last dimension with stride 1; other strides are passed."""
    return x if x.stride(-1) == 1 else x.contiguous()


def tile_size(block_size: int, head_dim: int) -> int:
    """Slots per decode tile: a power of two dividing block_size (a multiple of 16, not always a
    power of two), so a tile never straddles two blocks; at most 4096 / head_dim (32 slots at
    head_dim 128), which keeps a K and a V tile in fp32 in registers without spilling on sm_90."""
    return min(block_size & -block_size, max(16, 4096 // triton.next_power_of_2(head_dim)))


def paged_decode(
    q: torch.Tensor,
    out: torch.Tensor,
    pool: KVPool,
    tables: torch.Tensor,
    groups: torch.Tensor,
    group_base: int,
    num_kv_heads: int,
    read_len: torch.Tensor,
    evicted: torch.Tensor,
    comp_slot: int | None,
    scale: float,
    max_read: int,
    num_splits: int,
) -> None:
    """Decode attention of one run (KV heads of a layer sharing a level), written into `out`.

    q, out: [B, Hq, D], Hq = num_kv_heads (the layer's) * query heads per group; pool: the run's
    block pool; tables: [G, B, max_blocks] every group's block table; groups: [h] the run's group
    ids on q's device; group_base: layer * num_kv_heads; read_len, evicted: [B] int32;
    comp_slot: the level's compensation slot or None; max_read: an upper bound of read_len that
    sizes the splits (the last split also reads whatever lies beyond it).
    """
    b, hq, d = q.shape
    h, block_size = groups.numel(), pool.k.shape[1]
    gq = hq // num_kv_heads
    tile = tile_size(block_size, d)
    n_tiles = max(1, math.ceil(max_read / tile))
    tiles_per_split = math.ceil(n_tiles / max(1, num_splits))
    num_splits = math.ceil(n_tiles / tiles_per_split)
    split = num_splits > 1
    if split:
        m = torch.empty(b, hq, num_splits, dtype=torch.float32, device=q.device)
        lse = torch.empty_like(m)
        acc = torch.empty(b, hq, num_splits, d, dtype=torch.float32, device=q.device)
    else:
        m = lse = acc = out  # unused
    ks, vs = (pool.k_scale, pool.v_scale) if pool.is_int8 else (pool.k, pool.v)
    decode_kernel[(b, h, num_splits)](
        q, out, pool.k, pool.v, ks, vs, tables, groups, read_len, evicted, m, lse, acc,
        group_base, comp_slot or 0, scale * math.log2(math.e), tiles_per_split,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), pool.k.stride(0), pool.k.stride(1),
        tables.stride(0), tables.stride(1), m.stride(0), m.stride(1),
        GQ=gq, GQ_PAD=max(16, triton.next_power_of_2(gq)), D=d, D_PAD=max(16, triton.next_power_of_2(d)),
        BLOCK_SIZE=block_size, TILE=tile, INT8=pool.is_int8, HAS_COMP=comp_slot is not None, SPLIT=split,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4,
    )  # fmt: skip
    if split:
        combine_kernel[(b, h * gq)](
            out, m, lse, acc, groups, group_base, num_splits,
            out.stride(0), out.stride(1), m.stride(0), m.stride(1),
            GQ=gq, D=d, D_PAD=triton.next_power_of_2(d), S_PAD=triton.next_power_of_2(num_splits), num_warps=1,
        )  # fmt: skip


def store_kv(
    pool: KVPool,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    groups: torch.Tensor,
    group_base: int,
    tables: torch.Tensor | None = None,
    evicted: torch.Tensor | None = None,
    comp_slot: int | None = None,
    rope: tuple[torch.Tensor, ...] | None = None,
) -> None:
    """Writes one run's new tokens into its pool (quantized for int8 pools).

    k, v: [T, Hkv, D]; slots: [G, T] every group's flat slots, -1 = not kept; groups: [h] the run's
    group ids; group_base: layer * num_kv_heads. For a window run in decode (T = B, token t of
    sequence t) give tables [G, B, max_blocks], evicted [B] int32 (after this step) and comp_slot:
    the token leaving each ring is folded into the compensation slot before it is overwritten.
    rope: (q [T, Hq, D], q_out [T, Hq, D] contiguous, cos [T, D], sin [T, D]) to rotate k (given
    before RoPE) on its way into the cache, and the run's query heads from q into q_out.
    """
    t, h, d = k.shape[0], groups.numel(), k.shape[-1]
    if t == 0:
        return
    comp = comp_slot is not None
    ks, vs = (pool.k_scale, pool.v_scale) if pool.is_int8 else (pool.k, pool.v)
    tables = tables if comp else slots
    q, q_out, cos, sin = rope if rope is not None else (k, k, k, k)
    gq = q.shape[1] // k.shape[1]
    store_kernel[(t, h)](
        k, v, pool.k, pool.v, ks, vs, slots, groups, tables, evicted if comp else slots, q, q_out, cos, sin,
        group_base, comp_slot or 0, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        slots.stride(0), tables.stride(0), tables.stride(1), q.stride(0), q.stride(1), q_out.stride(0),
        D=d, D_PAD=triton.next_power_of_2(d), BLOCK_SIZE=pool.k.shape[1], INT8=pool.is_int8, COMP=comp,
        ROPE=rope is not None, GQ=gq, GQ_PAD=triton.next_power_of_2(gq), num_warps=1,
    )  # fmt: skip
