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

Proposers: n-gram prompt lookup (the longest suffix, n_max .. n_min tokens, of the tokens so far
that occurred before, and the k tokens that followed its latest earlier occurrence) and a draft
model (`DraftProposer`: greedy decoding of a smaller model of the same tokenizer). Both propose
tokens, not distributions, so the same acceptance rule serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from atb_llm.runtime.engine_config import EngineConfig
from atb_llm.runtime.sampler import Sampler, token_logprobs
from atb_llm.runtime.sequence import SamplingParams, Sequence, TokenLogprob

if TYPE_CHECKING:
    from atb_llm.runtime.engine import LLMEngine


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

    def propose_batch(self, seqs: list[Sequence], room: list[int]) -> list[list[int]]:
        return [self.propose(s.token_ids, r) for s, r in zip(seqs, room)]

    def release(self, request_id: str) -> None:
        """Nothing to free: prompt lookup keeps no state."""


class DraftProposer:
    """Proposals by greedy decoding of a draft model, for a step's sequences at once. The draft is
    an engine of its own (its own paged cache, full or compressed by its own plan) that no scheduler
    steps: each target sequence has a mirror sequence there, whose cache keeps the longest prefix
    of its tokens the draft computed before; a step catches every mirror up to its target's tokens
    in one prefill (each from where its prefix ends) and gives the first proposal, then k - 1
    decode steps give the rest. A rejection only shortens the prefix the next step keeps (the tail
    of a full group is overwritten; a compressed draft keeps what rejected tokens folded, which
    only changes what it proposes, never what is accepted)."""

    GREEDY = SamplingParams(max_tokens=1 << 30, ignore_eos=True)

    def __init__(self, draft: LLMEngine, k: int, vocab_size: int):
        self.draft, self.k, self.vocab_size = draft, k, vocab_size  # the target's: a larger draft table pads
        self.mirrors: dict[str, Sequence] = {}  # target request id -> its mirror in the draft

    @classmethod
    def load(cls, target: LLMEngine) -> DraftProposer:
        """The draft engine of `target`'s config (cfg.draft_model, compressed by cfg.draft_mlgc), sized
        for its batch and lengths plus the proposals; it must share the target's tokenizer."""
        cfg = target.cfg
        draft = type(target)(
            EngineConfig(
                cfg.draft_model,
                dtype=cfg.dtype,
                device=cfg.device,
                max_batch_size=cfg.max_batch_size,
                max_input_length=cfg.max_input_length,
                max_output_length=cfg.max_output_length + cfg.num_speculative_tokens,
                block_size=cfg.block_size,
                mlgc=cfg.draft_mlgc,
                progress=cfg.progress,
            )
        )
        if draft.tokenizer.get_vocab() != target.tokenizer.get_vocab():
            raise ValueError(
                f"the draft model {cfg.draft_model} has another tokenizer than {cfg.model_path}; a draft model must "
                "share the target's tokenizer (a smaller Qwen2.5 for a Qwen2.5)"
            )
        return cls(draft, cfg.num_speculative_tokens, target.model_config.vocab_size)

    def release(self, request_id: str) -> None:
        """The target sequence finished: free its mirror's blocks."""
        mirror = self.mirrors.pop(request_id, None)
        if mirror is not None:
            self.draft.cache_manager.block_manager.deallocate(mirror.block_table)

    def propose_batch(self, seqs: list[Sequence], room: list[int]) -> list[list[int]]:
        for request_id in set(self.mirrors) - {s.request_id for s in seqs}:  # preempted: recomputed later
            self.release(request_id)
        active = []
        for i, (seq, r) in enumerate(zip(seqs, room)):
            k = min(self.k, r)
            mirror = self._sync(seq, k) if k > 0 else None
            if mirror is not None:
                active.append((i, mirror, k))
        out: list[list[int]] = [[] for _ in seqs]
        if not active:
            return out
        runner, mirrors = self.draft.runner, [m for _, m, _ in active]
        for m in mirrors:
            m.num_scheduled_tokens = m.num_tokens - m.num_computed_tokens
        self._take(mirrors, runner.run(mirrors, True))
        for step in range(1, max(k for _, _, k in active)):
            going = [m for _, m, k in active if k > step and not m.error]
            if going:
                self._take(going, runner.run(going, False))
        for i, m, _ in active:
            tokens = [] if m.error else m.output_token_ids
            cut = next((j for j, t in enumerate(tokens) if t >= self.vocab_size), len(tokens))
            out[i] = list(tokens[:cut])
        return out

    def _sync(self, seq: Sequence, k: int) -> Sequence | None:
        """The mirror of `seq`, holding its tokens, the prefix the draft computed of them kept, and
        blocks for k more; None when the draft's pools have no room (no proposal this step)."""
        bm, tokens = self.draft.cache_manager.block_manager, seq.token_ids
        mirror = self.mirrors.get(seq.request_id)
        if mirror is None:
            mirror = self.mirrors[seq.request_id] = Sequence(list(tokens), self.GREEDY, seq.request_id)
            if not bm.can_allocate(mirror.block_table, len(tokens) + k):
                del self.mirrors[seq.request_id]
                return None
            bm.allocate(mirror.block_table, len(tokens) + k)
            return mirror
        old, keep = mirror.token_ids, 0
        while keep < min(mirror.num_computed_tokens, len(tokens) - 1) and old[keep] == tokens[keep]:
            keep += 1
        mirror.prompt_token_ids, mirror.output_token_ids = list(tokens), []
        mirror.num_computed_tokens, mirror.error = keep, None
        bm.truncate(mirror.block_table, keep)
        if not bm.can_append(mirror.block_table, len(tokens) + k):
            bm.deallocate(self.mirrors.pop(seq.request_id).block_table)
            return None
        bm.may_append(mirror.block_table, len(tokens) + k)
        return mirror

    @staticmethod
    def _take(mirrors: list[Sequence], result) -> None:
        """A draft step's bookkeeping, as the scheduler's postprocess does it for a sequence."""
        for m in mirrors:
            m.num_computed_tokens = m.num_tokens
        for m, token in zip(result.seqs, result.tokens):
            if token is None:
                m.error = m.error or "the draft's sampling failed"
            else:
                m.output_token_ids.append(token)


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
