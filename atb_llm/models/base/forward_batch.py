"""The forward contract: what one step hands the model. Built by the model runner, the decode CUDA
graphs and the KV-scale probe; the model reads it and never allocates cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atb_llm.cache.kv_cache import KVCache
from atb_llm.layers.attention.metadata import SpecRows
from atb_llm.layers.lora import LoraBatch


@dataclass(slots=True)
class ForwardBatch:
    """Tokens of all sequences packed in one flat batch (no padding); the cache and the tables are
    the cache manager's. G = layers x KV heads (groups), B sequences, T tokens this step."""

    input_ids: torch.Tensor  # [T]
    position_ids: torch.Tensor  # [T]
    is_prefill: bool
    kv_cache: KVCache
    block_tables: torch.Tensor  # [G, B, max_blocks] per-group block tables
    slots: torch.Tensor  # [G, T] flat cache slot of each token in each group, -1 = not kept
    input_lengths: torch.Tensor  # [B] sequence lengths including this step
    max_seq_len: int
    lm_head_indices: torch.Tensor | None = None  # [N] rows to compute logits for; None = all T
    q_lens: torch.Tensor | None = None  # [B] prefill: tokens of each sequence in this step (a chunk); None = all
    lora: LoraBatch | None = None  # the rows of each LoRA adapter in this step; None = the base model alone
    spec: SpecRows | None = None  # decode: a verify step, B rows of sequences at depths (speculative decoding)
