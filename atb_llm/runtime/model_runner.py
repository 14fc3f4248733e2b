"""Turns a scheduled batch into the forward contract's tensors, runs the model, samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atb_llm.cache.cache_manager import CacheManager
from atb_llm.cache.kv_cache import KVCache
from atb_llm.models.base.flash_causal_lm import FlashForCausalLM
from atb_llm.runtime.sampler import Sampler
from atb_llm.runtime.sequence import Sequence


@dataclass(slots=True)
class ForwardBatch:
    """The forward contract's arguments for one step (see FlashQwen2MlgcForCausalLM.forward)."""

    input_ids: torch.Tensor  # [T] tokens of all sequences, packed
    position_ids: torch.Tensor  # [T]
    is_prefill: bool
    kv_cache: KVCache
    block_tables: torch.Tensor  # [G, B, max_blocks] per-group block tables
    slots: torch.Tensor  # [G, T] flat cache slot of each token in each group, -1 = not kept
    input_lengths: torch.Tensor  # [B] sequence lengths including this step
    max_seq_len: int
    lm_head_indices: torch.Tensor | None  # [B] rows to compute logits for (prefill: each prompt's last)


class ModelRunner:
    def __init__(self, model: FlashForCausalLM, cache_manager: CacheManager):
        self.model = model
        self.cache_manager = cache_manager
        self.device = cache_manager.device
        self.sampler = Sampler()

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64).to(self.device)

    def prepare(self, seqs: list[Sequence], is_prefill: bool) -> ForwardBatch:
        """The forward contract's arguments for this step."""
        lengths = [s.num_tokens for s in seqs]
        if is_prefill:  # every token of each sequence (recomputed ones included), packed
            input_ids = [t for s in seqs for t in s.token_ids]
            positions = [p for n in lengths for p in range(n)]
            seq_idx = [i for i, n in enumerate(lengths) for _ in range(n)]
            ends, total = [], 0
            for n in lengths:
                total += n
                ends.append(total - 1)
            lm_head_indices = self._tensor(ends)
        else:  # the last sampled token of each sequence
            input_ids = [s.last_token for s in seqs]
            positions = [n - 1 for n in lengths]
            seq_idx = list(range(len(seqs)))
            lm_head_indices = None
        input_lengths = self._tensor(lengths)
        positions_t = self._tensor(positions)
        cm = self.cache_manager
        block_tables = cm.block_tables([s.block_table for s in seqs])
        slots = cm.slots(block_tables, self._tensor(seq_idx), positions_t, input_lengths)
        return ForwardBatch(
            input_ids=self._tensor(input_ids),
            position_ids=positions_t,
            is_prefill=is_prefill,
            kv_cache=cm.kv_cache,
            block_tables=block_tables,
            slots=slots,
            input_lengths=input_lengths,
            max_seq_len=max(lengths),
            lm_head_indices=lm_head_indices,
        )

    def logits(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """[B, V] fp32 next-token logits, one row per sequence."""
        b = self.prepare(seqs, is_prefill)
        return self.model(
            b.input_ids, b.position_ids, b.is_prefill, b.kv_cache, b.block_tables, b.slots, b.input_lengths,
            b.max_seq_len, b.lm_head_indices,
        )  # fmt: skip

    def run(self, seqs: list[Sequence], is_prefill: bool) -> tuple[list[int], list]:
        logits = self.logits(seqs, is_prefill)
        tokens = self.sampler(logits, seqs)
        return tokens, self.sampler.logprobs(logits, seqs, tokens)
