"""Continuous batching: admit waiting requests (prefill) whenever blocks allow, else decode
every running one; when blocks run out, preempt the newest and recompute it later.

With chunked prefill (vLLM's chunked prefill, MindIE's SplitFuse) a prefill step computes at most
`max_prefill_tokens` tokens: a longer prompt is prefilled over several steps, and while it is, prefill
and decode steps alternate, so running sequences keep producing tokens during a long prompt.

A prompt may also stop short once on purpose: where the prefix cache wants a snapshot of the
window groups (`snapshot_at`), and, for n > 1 samples, before its last token, where the siblings
take copies of its cache (`fork_at`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from atb_llm.cache.block_manager import BlockManager
from atb_llm.runtime.sequence import Sequence, SequenceStatus

log = logging.getLogger("atb_llm.scheduler")


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_batch_size: int,
        max_prefill_tokens: int,
        chunked: bool = False,
        propose: Callable[[list[Sequence]], list[list[int]]] | None = None,
    ):
        """propose: speculative decoding's proposer, for a decode step's sequences the tokens to
        verify after each one's last ([] for none); the step then verifies them where the pools
        have room for the verify rows, and plain-decodes the sequence otherwise."""
        self.block_manager = block_manager
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.chunked = chunked
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()  # in admission order; some may still be prefilling
        self.num_preemptions = 0  # since start, all sequences
        self.siblings: dict[Sequence, list[Sequence]] = {}  # n > 1: waiting for their first sibling's prompt
        self._last_was_prefill = False
        self.propose = propose
        self.num_proposed = self.num_accepted = self.num_verified = 0  # speculation: tokens, tokens, sequence-steps

    def add(self, seq: Sequence, sibling_of: Sequence | None = None) -> None:
        """Queue a request. `sibling_of`: an earlier request with the same prompt (one of n
        samples), which prefills the prompt once, all but its last token, and then hands a copy of
        its cache to each sibling (shared blocks where the level allows); the n sequences then
        compute the last prompt token together and sample each its own first token."""
        parent = sibling_of
        if parent is not None and parent.token_ids == seq.token_ids and parent.num_tokens > 1:
            if parent.status is SequenceStatus.WAITING or parent.num_computed_tokens < parent.num_tokens - 1:
                parent.fork_at = parent.num_tokens - 1
                self.siblings.setdefault(parent, []).append(seq)
                return
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose blocks are allocated and whose prompt is in the cache already (a replayed
        prefill): it decodes from the next step on."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def fork(self, parent: Sequence) -> None:
        """After `parent` computed its prompt but the last token: its siblings join the running batch
        on copies of its cache, where the pools and the batch have room (the others queue as new)."""
        at, parent.fork_at = parent.fork_at, 0
        for seq in self.siblings.pop(parent, []):
            room = len(self.running) < self.max_batch_size and parent.num_computed_tokens == at
            if room and self.block_manager.can_fork(parent.block_table, parent.num_computed_tokens):
                seq.block_table = self.block_manager.fork(parent.block_table, parent.num_computed_tokens)
                seq.num_computed_tokens = parent.num_computed_tokens
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
            else:
                self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.siblings)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Returns (sequences to run this step, is_prefill); each one's `num_scheduled_tokens` is set."""
        decoding = any(s.num_uncomputed_tokens == 1 for s in self.running)
        if not (self.chunked and decoding and self._last_was_prefill):
            scheduled = self._schedule_prefill()
            if scheduled:
                self._last_was_prefill = True
                return scheduled, True
        self._last_was_prefill = False
        return self._schedule_decode(), False

    def _schedule_prefill(self) -> list[Sequence]:
        """Chunks of sequences already prefilling first, then new admissions, within the budget."""
        scheduled, budget = [], self.max_prefill_tokens
        for seq in self.running:
            if seq.num_uncomputed_tokens > 1 and budget > 0:  # the rest of its prompt
                seq.num_scheduled_tokens = self._chunk(seq, budget)
                budget -= seq.num_scheduled_tokens
                scheduled.append(seq)
        admitted = []
        while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
            seq = self.waiting[0]
            over_budget = seq.num_tokens > budget if not self.chunked else budget <= 0
            tokens = self._cacheable(seq)
            if (scheduled and over_budget) or not self.block_manager.can_allocate(
                seq.block_table, seq.num_tokens, tokens, seq.adapter
            ):
                break
            self.waiting.popleft()
            # the whole prompt's blocks at once; a cached prefix is not computed again
            cached, seq.snapshot_at = self.block_manager.allocate(seq.block_table, seq.num_tokens, tokens, seq.adapter)
            seq.num_computed_tokens = seq.num_cached_tokens = cached
            seq.status = SequenceStatus.RUNNING
            seq.num_scheduled_tokens = self._chunk(seq, budget)
            budget -= seq.num_scheduled_tokens
            scheduled.append(seq)
            admitted.append(seq)
        self.running.extend(admitted)
        for seq in admitted:
            if seq.fork_at and seq.num_computed_tokens >= seq.fork_at:  # the prefix cache had all of it
                self.fork(seq)
        return scheduled

    def _schedule_decode(self) -> list[Sequence]:
        """Every sequence past its prefill, oldest first; one that cannot grow preempts the newest."""
        scheduled = []
        for seq in [s for s in self.running if s.num_uncomputed_tokens == 1]:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted for an older one in this pass
            while not self.block_manager.can_append(seq.block_table, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.may_append(seq.block_table, seq.num_tokens)
                seq.num_scheduled_tokens = 1
                scheduled.append(seq)
        if self.propose is not None and scheduled:  # after every plain decode has its blocks
            try:
                proposals = self.propose(scheduled)
            except Exception:  # a proposer's failure (a draft model's) costs speed, never the requests
                log.exception("the proposer failed; this step decodes without speculation")
                proposals = []
            for seq, tokens in zip(scheduled, proposals):
                if tokens:
                    seq.speculation = self.block_manager.speculate(seq.block_table, seq.num_tokens - 1, tokens)
        return scheduled

    def postprocess(self, seqs: list[Sequence], is_prefill: bool, result, finish_reason: Callable) -> list[Sequence]:
        """After a step: each sequence's computed tokens, prompt log-probabilities, prefix-cache records
        and forks; then each new token, and the end of the sequences it finishes (`finish_reason(seq)`:
        stop | length | None). `result` is the runner's StepResult. A sequence whose own part fails
        (its sampling, its stop check) ends alone, with reason "error"; the others go on. Returns the
        sequences that got a token."""
        bm, now = self.block_manager, time.perf_counter()
        for seq in seqs:
            seq.num_computed_tokens += seq.step_span(is_prefill)[1]
            if is_prefill and seq.params.prompt_logprobs is not None:  # [0]: the first token has none
                seq.prompt_logprobs = (seq.prompt_logprobs or [None]) + result.prompt_logprobs.get(seq, [])
            if is_prefill and seq.num_uncomputed_tokens == 0:  # later requests may share its prompt now
                bm.cache(seq.block_table, seq.token_ids, seq.num_computed_tokens, seq.adapter)
            if seq.snapshot_at and seq.num_computed_tokens == seq.snapshot_at:  # where requests meet
                bm.snapshot(seq.block_table, seq.token_ids, seq.snapshot_at, seq.adapter)
            if seq.fork_at and seq.num_computed_tokens >= seq.fork_at:
                self.fork(seq)
        more = result.more or [[]] * len(result.seqs)
        for seq, first, first_lp, first_out, rest in zip(
            result.seqs, result.tokens, result.option_logprobs, result.output_logprobs, more
        ):
            reason, appended = "error", 0
            for tok, lp, out_lp in [(first, first_lp, first_out), *rest]:  # a verify step's accepted tokens follow
                if tok is None:  # this sequence's sampling failed (seq.error says why)
                    reason = "error"
                    break
                seq.output_token_ids.append(tok)
                appended += 1
                if lp is not None:
                    seq.logprobs.append(lp)
                if out_lp is not None:
                    seq.output_logprobs.append(out_lp)
                seq.first_token_time = seq.first_token_time or now
                try:
                    reason = finish_reason(seq)
                except Exception as e:  # its stop strings or text: its own failure
                    seq.fail(e)
                    reason = "error"
                if reason:
                    break
            if seq.speculation is not None:  # keep the accepted rows' cache, free the rest
                accepted = max(appended - 1, 0)
                seq.num_computed_tokens += accepted
                bm.commit(seq.block_table, seq.speculation, accepted, seq.num_computed_tokens)
                self.num_proposed += len(seq.speculation.tokens)
                self.num_accepted += accepted
                self.num_verified += 1
                seq.speculation = None
            if reason:
                seq.finish_time = now
                self.finish(seq, reason)
        failed = [s for s in seqs if s.error and not s.is_finished]  # mid-prompt: its prompt log-probabilities
        for seq in failed:
            self.finish(seq, "error")
        return result.seqs + failed

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Prompt tokens to compute for `seq` in this step: the rest (chunked: within the budget),
        stopping where the prefix cache asked for a snapshot or the siblings fork."""
        n = min(seq.num_uncomputed_tokens, budget) if self.chunked else seq.num_uncomputed_tokens
        for stop in (seq.snapshot_at, seq.fork_at):
            if seq.num_computed_tokens < stop:
                n = min(n, stop - seq.num_computed_tokens)
        return n

    @staticmethod
    def _cacheable(seq: Sequence) -> list[int] | None:
        """The tokens to look up in the prefix cache: none when every prompt position must be
        computed (prompt log-probabilities)."""
        return None if seq.params.prompt_logprobs is not None else seq.token_ids

    def _free(self, seq: Sequence) -> None:
        self.block_manager.deallocate(seq.block_table, seq.token_ids, seq.num_computed_tokens, seq.adapter)

    def _preempt(self, seq: Sequence) -> None:
        """Free the blocks; the sequence is recomputed from its tokens when readmitted."""
        self.running.remove(seq)
        self._free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (finished or aborted) and free its blocks at once."""
        if seq.status is SequenceStatus.FINISHED:
            return
        self.waiting.extend(self.siblings.pop(seq, []))  # ended before its siblings forked: they start alone
        for siblings in self.siblings.values():
            if seq in siblings:
                siblings.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
            self._free(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
