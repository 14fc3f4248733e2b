"""Turns a scheduled batch into the forward contract's tensors, runs the model, samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from atb_llm.cache.cache_manager import CacheManager
from atb_llm.cache.kv_cache import KVCache
from atb_llm.models.base.flash_causal_lm import FlashForCausalLM
from atb_llm.runtime.sampler import Sampler, token_logprobs
from atb_llm.runtime.sequence import Sequence, TokenLogprob


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
    lm_head_indices: torch.Tensor | None  # [N] logits rows (prefill: each prompt's last; all with prompt_logprobs)
    sample_rows: torch.Tensor | None = None  # [B] logits rows to sample from, when N > B
    prompt_rows: list[tuple[int, int, int]] = field(default_factory=list)  # (seq, first row, rows) to score


@dataclass
class StepResult:
    """What one step gives each of its B sequences (None where not asked for)."""

    tokens: list[int | None]  # None: sampling failed for this sequence alone
    option_logprobs: list[dict[int, float] | None]  # params.logprob_token_ids
    output_logprobs: list[TokenLogprob | None]  # params.logprobs
    prompt_logprobs: dict[int, list[TokenLogprob]]  # params.prompt_logprobs, by sequence index, first prefill


class ModelRunner:
    def __init__(
        self, model: FlashForCausalLM, cache_manager: CacheManager, eos_token_ids: frozenset[int] = frozenset()
    ):
        self.model = model
        self.cache_manager = cache_manager
        self.device = cache_manager.device
        self.sampler = Sampler(eos_token_ids)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64).to(self.device)

    def prepare(self, seqs: list[Sequence], is_prefill: bool) -> ForwardBatch:
        """The forward contract's arguments for this step."""
        lengths = [s.num_tokens for s in seqs]
        sample_rows, prompt_rows = None, []
        if is_prefill:  # every token of each sequence (recomputed ones included), packed
            input_ids = [t for s in seqs for t in s.token_ids]
            positions = [p for n in lengths for p in range(n)]
            seq_idx = [i for i, n in enumerate(lengths) for _ in range(n)]
            rows, ends, start = [], [], 0
            for i, (s, n) in enumerate(zip(seqs, lengths)):
                if s.params.prompt_logprobs is not None and s.prompt_logprobs is None:
                    prompt_rows.append((i, len(rows), s.num_prompt_tokens - 1))  # positions predicting tokens 1..
                    rows.extend(range(start, start + s.num_prompt_tokens - 1))
                ends.append(len(rows))
                rows.append(start + n - 1)
                start += n
            lm_head_indices = self._tensor(rows)
            sample_rows = self._tensor(ends) if prompt_rows else None
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
            sample_rows=sample_rows,
            prompt_rows=prompt_rows,
        )

    def _forward(self, b: ForwardBatch) -> torch.Tensor:
        return self.model(
            b.input_ids, b.position_ids, b.is_prefill, b.kv_cache, b.block_tables, b.slots, b.input_lengths,
            b.max_seq_len, b.lm_head_indices,
        )  # fmt: skip

    def logits(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """[B, V] fp32 next-token logits, one row per sequence."""
        b = self.prepare(seqs, is_prefill)
        logits = self._forward(b)
        return logits if b.sample_rows is None else logits[b.sample_rows]

    def run(self, seqs: list[Sequence], is_prefill: bool) -> StepResult:
        b = self.prepare(seqs, is_prefill)
        logits = self._forward(b)
        prompt = {
            i: token_logprobs(logits[first : first + n], seqs[i].prompt_token_ids[1:], seqs[i].params.prompt_logprobs)
            for i, first, n in b.prompt_rows
        }
        if b.sample_rows is not None:
            logits = logits[b.sample_rows]
        tokens = self.sampler(logits, seqs)
        output: list[TokenLogprob | None] = [None] * len(seqs)
        wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None and tokens[i] is not None]
        for k in {seqs[i].params.logprobs for i in wanted}:  # one batched call per k asked for
            rows = [i for i in wanted if seqs[i].params.logprobs == k]
            for i, lp in zip(rows, token_logprobs(logits[rows], [tokens[i] for i in rows], k)):
                output[i] = lp
        return StepResult(tokens, self.sampler.logprobs(logits, seqs, tokens), output, prompt)
