"""Token embedding and the LM head (which computes logits only for the rows asked for)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atb_llm.layers.linear import LinearMethod, ReplicatedLinear
from atb_llm.layers.parallel import SINGLE, TensorParallel


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(ReplicatedLinear):
    """Column-parallel over the vocabulary when `tp` has several ranks: each computes its rows of
    the logits and every rank gets them all (an all-gather)."""

    def __init__(
        self, vocab_size: int, hidden_size: int, tp: TensorParallel = SINGLE, method: LinearMethod | None = None
    ):
        super().__init__(hidden_size, tp.local(vocab_size, "vocab_size"), False, method, tp, "column")

    def tie_to(self, embedding: VocabEmbedding) -> None:
        if type(self.method) is not LinearMethod:
            raise ValueError(
                "--quantize_lm_head: this model ties its LM head to the token embedding (tie_word_embeddings), "
                "which stays in float for the lookups; quantize the head of an untied model, or leave it out"
            )
        self.weight = embedding.weight
        self.shares_weight = True

    def forward(self, hidden: torch.Tensor, lm_head_indices: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: [T, H] -> logits [N, V] in fp32, N = len(lm_head_indices) or T."""
        if lm_head_indices is not None:
            hidden = hidden.index_select(0, lm_head_indices)
        return self.tp.all_gather(super().forward(hidden).float())
