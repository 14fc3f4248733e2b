"""Continuous batching: admit waiting requests (prefill) whenever blocks allow, else decode
every running one; when blocks run out, preempt the newest and recompute it later."""

from __future__ import annotations

from collections import deque

from atb_llm.cache.block_manager import BlockManager
from atb_llm.runtime.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_prefill_tokens: int):
        self.block_manager = block_manager
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0  # since start, all sequences

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Returns (sequences to run this step, is_prefill)."""
        scheduled, tokens = [], 0
        while self.waiting and len(self.running) + len(scheduled) < self.max_batch_size:
            seq = self.waiting[0]
            over_budget = scheduled and tokens + seq.num_tokens > self.max_prefill_tokens
            if over_budget or not self.block_manager.can_allocate(seq.block_table, seq.num_tokens):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq.block_table, seq.num_tokens)
            seq.status = SequenceStatus.RUNNING
            tokens += seq.num_tokens
            scheduled.append(seq)
        if scheduled:
            self.running.extend(scheduled)
            return scheduled, True

        while self.running:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq.block_table, seq.num_tokens):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.block_manager.may_append(seq.block_table, seq.num_tokens)
                scheduled.append(seq)
        self.running.extend(scheduled)
        return scheduled, False

    def _preempt(self, seq: Sequence) -> None:
        """Free the blocks; the sequence is recomputed from its tokens when readmitted."""
        self.block_manager.deallocate(seq.block_table)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (finished or aborted) and free its blocks at once."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
            self.block_manager.deallocate(seq.block_table)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
