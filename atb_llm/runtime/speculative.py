"""Speculative decoding: propose a few tokens cheaply, verify them all in one forward of the target.

A verify step gives a decoding sequence 1 + k rows: its last token and k proposed ones, each row a
decode query at its own length, so every row sees exactly what plain decode would see there, on
every level (see BlockManager.speculate for the window groups). Then, per sequence:

- greedy: the target's choice at each row; the proposals are accepted while they equal it, and
  the target's token at the first difference (or after the last proposal) comes free;
- sampled: the rule of Leviathan et al. 2023 / Chen et al. 2023 for a proposer that puts all its
  mass on one token d (prompt lookup): accept d with probability p(d), else draw from p with d
  removed, renormalized; after k accepted proposals, draw the next token from p. The tokens are
  distributed exactly as the target's, with temperature, top-k, top-p, penalties and min_tokens
  applied to each row as plain decode applies them at that point (`RowView`).

The proposer here is n-gram prompt lookup: the longest suffix (n_max .. 1 tokens) of the tokens so
far that occurred before, and the k tokens that followed its latest earlier occurrence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atb_llm.runtime.sampler import Sampler, token_logprobs
from atb_llm.runtime.sequence import Sequence, TokenLogprob


@dataclass(frozen=True)
class NgramProposer:
    k: int = 4  # tokens proposed at most
    n_max: int = 3  # longest suffix matched
    n_min: int = 1

    def __post_init__(self):
        if self.k < 1 or not 1 <= self.n_min <= self.n_max:
            raise ValueError(
                f"num_speculative_tokens={self.k} must be at least 1 and 1 <= n_min={self.n_min} <= "
                f"ngram_max={self.n_max}; e.g. --num_speculative_tokens 4 --ngram_max 3"
            )

    def propose(self, tokens: list[int], k: int | None = None) -> list[int]:
        """Up to `k` (default self.k) tokens that followed the latest earlier occurrence of the
        longest matching suffix of `tokens`; [] when no suffix of n_min tokens or more recurs."""
        k = self.k if k is None else min(k, self.k)
        if k < 1:
            return []
        end = len(tokens)
        for n in range(min(self.n_max, end - 1), self.n_min - 1, -1):
            suffix = tokens[end - n :]
            first = suffix[0]
            for start in range(end - n - 1, -1, -1):  # latest occurrence first, not the suffix itself
                if tokens[start] == first and tokens[start : start + n] == suffix:
                    return tokens[start + n : start + n + k]
        return []


class RowView:
    """A sequence as it would stand after `extra` more tokens: what the sampler reads of it (params,
    tokens, generator, error) for the row that verifies the token after them."""

    def __init__(self, seq: Sequence, extra: list[int]):
        self.seq, self.params = seq, seq.params
        self.output_token_ids = seq.output_token_ids + extra
        self.token_ids = seq.prompt_token_ids + self.output_token_ids

    @property
    def generator(self):
        return self.seq.generator

    @generator.setter
    def generator(self, value) -> None:
        self.seq.generator = value

    @property
    def error(self) -> str | None:
        return self.seq.error

    @error.setter
    def error(self, value: str | None) -> None:
        self.seq.error = value


@dataclass
class Verified:
    """What one sequence's verify rows gave: its new tokens (the accepted proposals and the target's
    own), and their option and output log-probabilities as plain decode would record them."""

    tokens: list[int]
    options: list[dict[int, float] | None]
    outputs: list[TokenLogprob | None]


def verify(sampler: Sampler, logits: torch.Tensor, seq: Sequence, proposal: list[int]) -> Verified:
    """logits: [1 + k, V] fp32, the rows of `seq`'s last token and of its k proposed tokens."""
    greedy = seq.params.temperature < seq.params.GREEDY_BELOW
    tokens: list[int] = []
    if greedy and not seq.params.penalized:
        chosen = logits.argmax(-1).tolist()
        for i, t in enumerate(chosen):
            tokens.append(t)
            if i == len(proposal) or t != proposal[i]:
                break
    else:
        for i in range(len(proposal) + 1):
            view = RowView(seq, proposal[:i])
            if greedy:
                t = sampler(logits[i : i + 1], [view])[0]
            else:
                probs = sampler.distribution(logits[i], view)
                t = None
                if i < len(proposal):
                    d = proposal[i]
                    u = torch.rand((), generator=seq.generator, device=probs.device)  # after distribution made it
                    if u < probs[d]:
                        t = d
                    else:
                        probs = probs.clone()
                        probs[d] = 0.0
                        probs = probs / probs.sum()
                t = sampler.draw(probs, view) if t is None else t
            if t is None:  # the sampler failed (non-finite probabilities): seq.error says why
                break
            tokens.append(t)
            if i == len(proposal) or t != proposal[i]:
                break
    rows = logits[: len(tokens)]
    views = [RowView(seq, tokens[:i]) for i in range(len(tokens))]
    options = sampler.logprobs(rows, views, tokens)
    outputs: list[TokenLogprob | None] = [None] * len(tokens)
    if seq.params.logprobs is not None and tokens:
        outputs = token_logprobs(rows, tokens, seq.params.logprobs)
    return Verified(tokens, options, outputs)
