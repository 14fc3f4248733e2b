"""Decode steps as CUDA graphs: the whole decode forward captured once per batch-size bucket and
replayed, so a step costs one launch instead of a few hundred (what bounds small-batch decode).

A graph reads its inputs from static buffers sized for the largest batch: each step copies its
tokens, positions, lengths, slots and block tables into them and replays the graph of the
smallest bucket that holds the batch. Rows past the batch are padding: length 1, slot -1 (the
cache write skips them, so nothing is written and no window folds), block table 0 (read, never
written). A graph is captured the first time its bucket runs: that step runs eagerly (which
also compiles the Triton kernels and fills the backend's caches outside the capture), then the
capture records the same work without running it. The forward is captured with the engine's
longest sequence as max_seq_len, so the attention kernels' splits cover any step (each program
reads only up to its sequence's length). Sampling stays outside the graph.

Without CUDA the same buffers are used and the forward runs eagerly on them: that is how the
tests check the padding and the buffer handling on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from atb_llm.cache.kv_cache import KVCache
from atb_llm.models.base.forward_batch import ForwardBatch


def buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, then every multiple of 8, up to max_batch (included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(8, max_batch, 8))
    return sorted(set(sizes) | {max_batch})


def use_graphs(device: str, backend_graphs: bool, enforce_eager: bool) -> bool:
    """Decode runs as CUDA graphs on CUDA with a backend that can be captured, unless forced eager."""
    return torch.device(device).type == "cuda" and backend_graphs and not enforce_eager


def buffer_blocks(max_seq_len: int, block_size: int) -> int:
    """Block-table width of the buffers: a sequence of max_seq_len tokens, and one block to spare
    (a step with a wider table runs eagerly)."""
    return -(-max_seq_len // block_size) + 1


class DecodeGraphs:
    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        kv_cache: KVCache,
        max_batch: int,
        max_blocks: int,
        max_seq_len: int,
        device: torch.device | str,
    ):
        self.model, self.kv_cache, self.max_seq_len = model, kv_cache, max_seq_len
        self.device = torch.device(device)
        self.sizes = buckets(max_batch)
        groups = kv_cache.layout.num_layers * kv_cache.layout.num_kv_heads
        i64 = dict(dtype=torch.int64, device=self.device)
        self.input_ids = torch.zeros(max_batch, **i64)
        self.positions = torch.zeros(max_batch, **i64)
        self.input_lengths = torch.ones(max_batch, **i64)
        self.slots = torch.full((groups, max_batch), -1, **i64)
        self.block_tables = torch.zeros(groups, max_batch, max_blocks, **i64)
        self.graphs: dict[int, Callable[[], torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None

    def bucket(self, n: int) -> int | None:
        """The smallest bucket holding n sequences; None: more than the largest."""
        return next((s for s in self.sizes if s >= n), None)

    def fits(self, block_tables: torch.Tensor) -> bool:
        """Whether a decode step with these block tables [G, n, blocks] fits the buffers (else: eager)."""
        return self.bucket(block_tables.shape[1]) is not None and block_tables.shape[2] <= self.block_tables.shape[2]

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(
            ForwardBatch(
                self.input_ids[:size], self.positions[:size], False, self.kv_cache, self.block_tables[:, :size],
                self.slots[:, :size], self.input_lengths[:size], self.max_seq_len,
            )
        )  # fmt: skip

    def _capture(self, size: int) -> Callable[[], torch.Tensor]:
        if self.device.type != "cuda":
            return lambda: self._forward(size)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(size)

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay

    def run(self, b: ForwardBatch) -> torch.Tensor:
        """One decode step of n sequences -> logits [n, vocab]."""
        n, blocks = b.input_lengths.shape[0], b.block_tables.shape[2]
        if not self.fits(b.block_tables):
            raise ValueError(f"a decode step of {n} sequences x {blocks} blocks exceeds the graphs' buffers")
        size = self.bucket(n)
        self.input_ids[:n].copy_(b.input_ids)
        self.positions[:n].copy_(b.position_ids)
        self.input_lengths[:n].copy_(b.input_lengths)
        self.slots[:, :n].copy_(b.slots)
        self.block_tables[:, :n, :blocks].copy_(b.block_tables)
        if size > n:  # padding rows: length 1, not kept, block 0
            self.input_ids[n:size] = 0
            self.positions[n:size] = 0
            self.input_lengths[n:size] = 1
            self.slots[:, n:size] = -1
            self.block_tables[:, n:size] = 0
        if size not in self.graphs:
            logits = self._forward(size)  # this step, eagerly: compiles and warms up outside the capture
            self.graphs[size] = self._capture(size)
            return logits[:n]
        return self.graphs[size]()[:n]
