"""Per-step attention metadata, built once per forward from the contract's arguments."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from atb_llm.compression.levels import Level


@dataclass(frozen=True)
class SpecRows:
    """A verify step (speculative decoding) in decode form: each sequence brings rows at depths
    0..k, row d being the d-th proposed token at its own length. depths[d]: [R_d] the rows at depth
    d; parents[d]: [R_d] the row at depth d - 1 of the same sequence (parents[0] is unused). Window
    groups write depth by depth, each row first copying its parent's blocks where its own table
    differs (see atb_llm.cache.block_manager.BlockManager.speculate)."""

    depths: list[torch.Tensor]
    parents: list[torch.Tensor | None]


@dataclass(slots=True)
class AttentionMetadata:
    is_prefill: bool
    block_tables: torch.Tensor  # [G, B, max_blocks] int64: physical block ids of each group (padded with 0)
    slots: torch.Tensor  # [G, T] int64: flat cache slot of each new token in each group, -1 = not kept
    input_lengths: torch.Tensor  # [B] int64: tokens of each sequence, this step's included
    max_seq_len: int
    block_size: int
    dtype: torch.dtype  # the model dtype: attention masks are built in it
    cu_seqlens: torch.Tensor | None = None  # [B + 1] prefill: start of each sequence in the packed batch
    context_lens: list[int] | None = None  # prefill: tokens each sequence has in the cache before this chunk
    spec: SpecRows | None = None  # decode: a verify step's rows (speculative decoding)
    _views: dict = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        is_prefill: bool,
        block_tables: torch.Tensor,
        slots: torch.Tensor,
        input_lengths: torch.Tensor,
        max_seq_len: int,
        block_size: int,
        dtype: torch.dtype,
        q_lens: torch.Tensor | None = None,
        spec: SpecRows | None = None,
    ) -> AttentionMetadata:
        """q_lens: [B] prefill tokens of each sequence in this step (chunked prefill); None = all
        of input_lengths, the whole prompt."""
        cu = context = None
        if is_prefill:
            lengths = input_lengths.cpu()
            q = lengths if q_lens is None else q_lens.cpu()
            cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
            cu[1:] = torch.cumsum(q, 0)
            context = (lengths - q).tolist()
            if min(context) < 0:
                raise ValueError(f"q_lens {q.tolist()} exceed input_lengths {lengths.tolist()}")
        return cls(is_prefill, block_tables, slots, input_lengths, max_seq_len, block_size, dtype, cu, context, spec)

    @property
    def has_context(self) -> bool:
        """Prefill of a chunk after earlier chunks of the same sequence (their K/V are in the cache)."""
        return bool(self.context_lens) and max(self.context_lens) > 0

    def decode_view(self, level: Level) -> tuple[int, torch.Tensor]:
        """For the groups of `level`: (blocks to read, additive mask [B, 1, 1, blocks * block_size]).

        The mask is 0 on the slots the level reads, -inf elsewhere, and on the compensation slot
        log(n_evicted) (-inf while nothing is evicted). Computed once per level per step.
        """
        if level not in self._views:
            n = self.input_lengths
            nb = max(1, math.ceil(int(level.read_len(n).max()) / self.block_size))
            mask = level_mask(level, n, nb * self.block_size, self.dtype)
            self._views[level] = (nb, mask[:, None, None, :])
        return self._views[level]

    def level_lengths(self, level: Level) -> tuple[torch.Tensor, torch.Tensor]:
        """For kernels that mask by length instead of by a mask tensor: (read_len, evicted), both
        [B] int32 on the lengths' device. read_len: slots decode reads from slot 0; evicted: tokens
        folded into the compensation slot, whose logit gets log(evicted) (-inf while 0). The same
        geometry as `decode_view`; computed once per level per step, without a host sync."""
        key = ("lengths", level)
        if key not in self._views:
            n = self.input_lengths
            self._views[key] = (level.read_len(n).to(torch.int32), level.evicted(n).to(torch.int32))
        return self._views[key]


def level_mask(level: Level, n: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, width] additive mask over a group's first `width` slots at sequence lengths n [B]: 0 on the
    slots `level` reads, -inf beyond, log(n_evicted) on the compensation slot (-inf while nothing
    is evicted). The one builder of the compensation bias for decode and for prefill's context."""
    pos = torch.arange(width, device=n.device)
    mask = torch.zeros(len(n), width, dtype=dtype, device=n.device)
    mask.masked_fill_(pos[None, :] >= level.read_len(n)[:, None], float("-inf"))
    if level.comp_slot is not None and level.comp_slot < width:
        mask[:, level.comp_slot] = level.comp_bias(n).to(dtype)
    return mask
