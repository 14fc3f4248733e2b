"""Turns a scheduled batch into the forward contract's tensors, runs the model, samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from atb_llm.cache.cache_manager import CacheManager
from atb_llm.layers.attention.metadata import SpecRows
from atb_llm.layers.lora import LoraBatch
from atb_llm.layers.parallel import SINGLE, TensorParallel
from atb_llm.models.base.flash_causal_lm import FlashForCausalLM
from atb_llm.models.base.forward_batch import ForwardBatch
from atb_llm.runtime.cuda_graph import DecodeGraphs
from atb_llm.runtime.sampler import Sampler, token_logprobs
from atb_llm.runtime.sequence import Sequence, TokenLogprob
from atb_llm.runtime.speculative import Verified, verify


@dataclass(slots=True)
class StepBatch:
    """One step: the model's input and what to read from its logits."""

    forward: ForwardBatch
    sampled: list[int] = field(default_factory=list)  # sequences that get a token: their chunk ends the prompt
    sample_rows: torch.Tensor | None = None  # [len(sampled)] logits rows to sample from, when they are not all
    prompt_rows: list[tuple[int, int, int, int]] = field(default_factory=list)  # (seq, first row, from, to) scored
    verify_rows: list[tuple[int, int]] | None = None  # a verify step: each sequence's (first row, rows)


@dataclass
class StepResult:
    """What one step gives each sequence that got a token (`seqs`; None where not asked for)."""

    seqs: list[Sequence]  # the step's sequences whose chunk ended the prompt, or decoding ones
    tokens: list[int | None]  # None: sampling failed for this sequence alone
    option_logprobs: list[dict[int, float] | None]  # params.logprob_token_ids
    output_logprobs: list[TokenLogprob | None]  # params.logprobs
    prompt_logprobs: dict[Sequence, list[TokenLogprob]]  # params.prompt_logprobs: this chunk's positions
    more: list[list[tuple[int, dict[int, float] | None, TokenLogprob | None]]] | None = None  # verify: tokens after


class ModelRunner:
    def __init__(
        self,
        model: FlashForCausalLM,
        cache_manager: CacheManager,
        eos_token_ids: frozenset[int] = frozenset(),
        graphs: DecodeGraphs | None = None,
        tp: TensorParallel = SINGLE,
    ):
        """graphs: decode steps that fit one of its buckets replay its CUDA graphs. tp: every rank
        runs the same steps on the same logits (gathered), and rank 0's sampled tokens are every
        rank's, so their schedulers stay in step."""
        self.model = model
        self.cache_manager = cache_manager
        self.sampler = Sampler(eos_token_ids)
        self.graphs = graphs
        self.tp = tp

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return self.cache_manager.to_device(torch.tensor(values, dtype=torch.int64))

    def prepare(self, seqs: list[Sequence], is_prefill: bool) -> StepBatch:
        """The forward contract for this step, and the logits rows to sample and score."""
        self.cache_manager.flush_copies()
        if not is_prefill and any(s.speculation is not None for s in seqs):
            return self._prepare_verify(seqs)
        input_ids, positions, seq_idx, q_lens, lengths = [], [], [], [], []
        rows, ends, sampled, prompt_rows, start = [], [], [], [], 0
        for i, s in enumerate(seqs):
            c, n = s.step_span(is_prefill)
            end = c + n
            input_ids += s.token_ids[c:end]
            positions += range(c, end)
            seq_idx += [i] * n
            q_lens.append(n)
            lengths.append(end)
            if is_prefill and s.params.prompt_logprobs is not None:
                scored = len(s.prompt_logprobs or [None])  # prompt positions with a logprob (0 never has one)
                lo, hi = max(c, scored - 1), min(end, s.num_prompt_tokens - 1)  # row at p predicts token p + 1
                if hi > lo:
                    prompt_rows.append((i, len(rows), lo, hi))
                    rows.extend(range(start + lo - c, start + hi - c))
            if end == s.num_tokens:  # the chunk ends the sequence: sample its next token
                sampled.append(i)
                ends.append(len(rows))
                rows.append(start + n - 1)
            start += n
        input_lengths = self._tensor(lengths)
        positions_t = self._tensor(positions)
        cm = self.cache_manager
        block_tables = cm.block_tables([s.block_table for s in seqs])
        slots = cm.slots(block_tables, self._tensor(seq_idx), positions_t, input_lengths)
        forward = ForwardBatch(
            input_ids=self._tensor(input_ids),
            position_ids=positions_t,
            is_prefill=is_prefill,
            kv_cache=cm.kv_cache,
            block_tables=block_tables,
            slots=slots,
            input_lengths=input_lengths,
            max_seq_len=max(lengths),
            lm_head_indices=self._tensor(rows) if is_prefill else None,
            q_lens=self._tensor(q_lens) if is_prefill else None,
            lora=self._lora(seqs, q_lens, positions_t.device),
        )
        return StepBatch(
            forward,
            sampled=sampled,
            sample_rows=self._tensor(ends) if prompt_rows else None,
            prompt_rows=prompt_rows,
        )

    def _prepare_verify(self, seqs: list[Sequence]) -> StepBatch:
        """A decode step with speculation: each sequence's last token and its proposed tokens, each a
        row at its own length with its own block tables (cache.block_manager.Speculation)."""
        input_ids, positions, lengths, tables, verify_rows = [], [], [], [], []
        depths: list[list[int]] = []
        for s in seqs:
            proposal = s.speculation.tokens if s.speculation is not None else []
            c, first = s.num_tokens - 1, len(input_ids)
            for d, token in enumerate([s.token_ids[-1], *proposal]):
                input_ids.append(token)
                positions.append(c + d)
                lengths.append(c + d + 1)
                tables.append(s.block_table if d == 0 else s.speculation.rows[d - 1])
                if d == len(depths):
                    depths.append([])
                depths[d].append(first + d)
            verify_rows.append((first, 1 + len(proposal)))
        cm = self.cache_manager
        input_lengths, positions_t = self._tensor(lengths), self._tensor(positions)
        block_tables = cm.block_tables(tables)
        slots = cm.slots(block_tables, self._tensor(list(range(len(lengths)))), positions_t, input_lengths)
        spec = SpecRows(
            [self._tensor(rows) for rows in depths],
            [None] + [self._tensor([r - 1 for r in rows]) for rows in depths[1:]],
        )
        forward = ForwardBatch(
            input_ids=self._tensor(input_ids),
            position_ids=positions_t,
            is_prefill=False,
            kv_cache=cm.kv_cache,
            block_tables=block_tables,
            slots=slots,
            input_lengths=input_lengths,
            max_seq_len=max(lengths),
            lora=self._lora(seqs, [n for _, n in verify_rows], positions_t.device),
            spec=spec,
        )
        return StepBatch(forward, sampled=list(range(len(seqs))), verify_rows=verify_rows)

    @staticmethod
    def _lora(seqs: list[Sequence], q_lens: list[int], device) -> LoraBatch | None:
        """Each row's LoRA adapter; None (nothing built) when the step is the base model's alone."""
        if not any(s.adapter for s in seqs):
            return None
        return LoraBatch.of_rows([s.adapter for s, n in zip(seqs, q_lens) for _ in range(n)], device)

    def _forward(self, b: ForwardBatch) -> torch.Tensor:
        if b.is_prefill or b.lora is not None or b.spec is not None:
            return self.model(b)
        if self.graphs is not None and self.graphs.fits(b.block_tables):
            return self.graphs.run(b)
        return self.model(b)

    def logits(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """[N, V] fp32 next-token logits, one row per sequence that gets a token."""
        b = self.prepare(seqs, is_prefill)
        logits = self._forward(b.forward)
        return logits if b.sample_rows is None else logits[b.sample_rows]

    def run(self, seqs: list[Sequence], is_prefill: bool) -> StepResult:
        """One step: the forward of the whole batch (a failure there is the engine's and propagates),
        then each sequence's own outputs. Those are computed for the batch at once; should that
        raise, they are computed again one sequence at a time, and a sequence whose own outputs fail
        gets `error` set and no token, while the others get exactly what they would have alone."""
        b = self.prepare(seqs, is_prefill)
        logits = self._forward(b.forward)
        if b.verify_rows is not None:
            return self._verify(logits, seqs, b.verify_rows)
        prompt = {}
        for i, first, lo, hi in b.prompt_rows:  # row at position p scores prompt token p + 1
            s = seqs[i]
            try:
                prompt[s] = token_logprobs(
                    logits[first : first + hi - lo], s.prompt_token_ids[lo + 1 : hi + 1], s.params.prompt_logprobs
                )
            except Exception as e:
                s.fail(e)
        if b.sample_rows is not None:
            logits = logits[b.sample_rows]
        sampled = [seqs[i] for i in b.sampled]
        tokens, options, output = self._sample_isolated(logits, sampled) if sampled else ([], [], [])
        if self.tp.world > 1:  # sampling happens once: rank 0's tokens (and failures) go to every rank
            tokens = self.tp.broadcast(tokens)
            for s, t in zip(sampled, tokens):
                if t is None and not s.error:
                    s.fail("its sampling failed on rank 0")
        return StepResult(sampled, tokens, options, output, prompt)

    def _verify(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[tuple[int, int]]) -> StepResult:
        """Each sequence's accepted tokens from its verify rows (atb_llm.runtime.speculative); a
        sequence whose own part fails gets `error` and no token, the others are not affected."""
        out = []
        for s, (first, n) in zip(seqs, rows):
            proposal = s.speculation.tokens if s.speculation is not None else []
            try:
                out.append(verify(self.sampler, logits[first : first + n], s, proposal))
            except Exception as e:
                s.fail(e)
                out.append(Verified([], [], []))
        if self.tp.world > 1:  # rank 0's tokens on every rank
            tokens = self.tp.broadcast([v.tokens for v in out])
            out = [v if v.tokens == t else Verified(t, [None] * len(t), [None] * len(t)) for v, t in zip(out, tokens)]
            for s, v in zip(seqs, out):
                if not v.tokens and not s.error:
                    s.fail("its sampling failed on rank 0")
        first = [v.tokens[0] if v.tokens else None for v in out]
        options = [v.options[0] if v.tokens else None for v in out]
        outputs = [v.outputs[0] if v.tokens else None for v in out]
        more = [list(zip(v.tokens[1:], v.options[1:], v.outputs[1:])) for v in out]
        return StepResult(list(seqs), first, options, outputs, {}, more)

    def _sample_isolated(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list, list, list]:
        seeded = {
            s: None if s.generator is None else s.generator.get_state() for s in seqs if s.params.seed is not None
        }
        try:
            return self._sample(logits, seqs)
        except Exception:  # find whose: one sequence at a time, seeded ones from where they were
            for s, state in seeded.items():
                if state is None:
                    s.generator = None
                else:
                    s.generator.set_state(state)
        outs = ([], [], [])
        for i, s in enumerate(seqs):
            try:
                one = self._sample(logits[i : i + 1], [s])
            except Exception as e:
                s.fail(e)
                one = ([None], [None], [None])
            for out, value in zip(outs, one):
                out += value
        return outs

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list, list, list]:
        """(tokens, option log-probabilities, output log-probabilities), one each per sequence; None
        for a sequence that already failed or whose sampling failed."""
        tokens = self.sampler(logits, seqs)
        tokens = [None if s.error else t for s, t in zip(seqs, tokens)]
        output: list[TokenLogprob | None] = [None] * len(seqs)
        wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None and tokens[i] is not None]
        for k in {seqs[i].params.logprobs for i in wanted}:  # one batched call per k asked for
            rows = [i for i in wanted if seqs[i].params.logprobs == k]
            for i, lp in zip(rows, token_logprobs(logits[rows], [tokens[i] for i in rows], k)):
                output[i] = lp
        return tokens, self.sampler.logprobs(logits, seqs, tokens), output
