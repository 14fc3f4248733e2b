"""K/V's way into the cache, as every level keeps it: the reference write (the torch backend's, and
the one other backends are checked against), the compensation slot of window levels (a running
mean in decode, the fold of a prefill chunk), for the tokens of one layer.

The cache (atb_llm.cache.kv_cache) only stores: pools of blocks and the slot arithmetic.
"""

from __future__ import annotations

import torch

from atb_llm.cache.kv_cache import KVCache
from atb_llm.compression.layout import Run
from atb_llm.layers.attention.metadata import AttentionMetadata


def store(kv_cache: KVCache, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    """k, v: [T, Hkv, D] new keys (after RoPE) and values. Each group of `layer` writes the tokens
    its level keeps (meta.slots >= 0); window groups first fold what leaves the window into their
    compensation slot."""
    if meta.spec is not None:
        store_verify(kv_cache, layer, k, v, meta)
        return
    for run in kv_cache.layout.runs(layer):
        pool = kv_cache.pools[run.pool]
        kr, vr = (k, v) if run.all_heads(k.shape[1]) else (k[:, list(run.heads)], v[:, list(run.heads)])
        slots = meta.slots[run.groups].T  # [T, h]
        if run.level.comp_slot is not None:
            if meta.is_prefill:
                fold_prefill(kv_cache, run, kr, vr, meta)
            else:
                fold_decode(kv_cache, run, slots, meta)
        if run.level.drops_tokens:
            keep = slots >= 0
            pool.write(slots[keep], kr[keep], vr[keep])
        else:
            pool.write(slots.flatten(), kr.flatten(0, 1), vr.flatten(0, 1))


def store_verify(kv_cache: KVCache, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    """A verify step's write (k, v: [R, Hkv, D], one row per sequence and depth). Full groups write
    every row at once (each its own slot). Window groups go depth by depth: a row copies its
    parent's blocks where its table holds its own copy, then folds and writes as decode does, so
    that it holds exactly what plain decode holds at its length."""
    for run in kv_cache.layout.runs(layer):
        pool = kv_cache.pools[run.pool]
        kr, vr = (k, v) if run.all_heads(k.shape[1]) else (k[:, list(run.heads)], v[:, list(run.heads)])
        slots = meta.slots[run.groups].T  # [R, h]
        if run.level.comp_slot is None:
            keep = slots >= 0
            pool.write(slots[keep], kr[keep], vr[keep])
            continue
        tables = meta.block_tables[run.groups]  # [h, R, nb]
        for rows, parents in zip(meta.spec.depths, meta.spec.parents):
            if parents is not None:
                src, dst = tables[:, parents], tables[:, rows]
                differ = src != dst
                if differ.any():
                    pool.copy_blocks(src[differ].tolist(), dst[differ].tolist())
            fold_decode(kv_cache, run, slots, meta, rows)
            keep = slots[rows] >= 0
            pool.write(slots[rows][keep], kr[rows][keep], vr[rows][keep])


def fold_decode(
    kv_cache: KVCache, run: Run, slots: torch.Tensor, meta: AttentionMetadata, among: torch.Tensor | None = None
) -> None:
    """Decode of a window run, before its tokens are written (slots: [B, h] where they go): the slot
    a new token overwrites holds the token leaving the window; fold it into the compensation slot,
    which stays the mean K and V of the evicted middle. `among`: only these rows (a verify step's
    depth)."""
    level, pool = run.level, kv_cache.pools[run.pool]
    evicted = level.evicted(meta.input_lengths)  # [B] after this step
    if among is not None:
        kept = torch.zeros_like(evicted)
        kept[among] = 1
        evicted = evicted * kept
    rows = (evicted > 0).nonzero().flatten()
    if rows.numel() == 0:
        return
    tables = meta.block_tables[run.groups]  # [h, B, nb]
    comp = kv_cache.flat_slots(tables, rows, torch.full_like(rows, level.comp_slot)).T  # [R, h]
    old, dst = slots[rows].flatten(), comp.flatten()
    ok, ov = pool.read(old, torch.float32)
    ck, cv = pool.read(dst, torch.float32)
    e = evicted[rows].repeat_interleave(comp.shape[1]).float()[:, None]
    pool.write(dst, level.fold_token(ck, ok, e), level.fold_token(cv, ov, e))


def fold_prefill(kv_cache: KVCache, run: Run, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    """Prefill of a window run (k, v: [T, h, D], the run's heads), before its tokens are written:
    each compensation slot becomes the mean of every token evicted so far. A chunk evicts the ring
    tokens of earlier chunks it overwrites, then its own tokens that fall out; what earlier chunks
    evicted is already in the slot. A whole prompt is a chunk without context."""
    level, pool = run.level, kv_cache.pools[run.pool]
    context = torch.tensor(meta.context_lens)
    before, after = level.evicted(context), level.evicted(meta.input_lengths.cpu())
    tables = meta.block_tables[run.groups]  # [h, B, nb]
    dev = tables.device
    for b in (after > before).nonzero().flatten().tolist():
        c, e0 = meta.context_lens[b], int(before[b])
        first, last = level.sink + e0, level.sink + int(after[b])  # positions leaving now
        seq = torch.tensor([b], device=dev)
        ks, vs = [], []
        if first < c:  # still in the ring, where the cache holds them at length c
            pos = torch.arange(first, min(last, c), device=dev)
            ring = kv_cache.flat_slots(tables, seq.expand(len(pos)), level.slot_of(pos, torch.full_like(pos, c)))
            rk, rv = pool.read(ring.T.flatten(), torch.float32)
            ks.append(rk.view(len(pos), -1, rk.shape[-1]))
            vs.append(rv.view(len(pos), -1, rv.shape[-1]))
        if last > c:  # this chunk's own tokens
            start = int(meta.cu_seqlens[b]) - c
            ks.append(k[start + max(first, c) : start + last].float())
            vs.append(v[start + max(first, c) : start + last].float())
        comp = kv_cache.flat_slots(tables, seq, torch.tensor([level.comp_slot], device=dev))[:, 0]  # [h]
        ck, cv = pool.read(comp, torch.float32) if e0 else (None, None)
        pool.write(comp, level.fold(ck, e0, torch.cat(ks)), level.fold(cv, e0, torch.cat(vs)))
