"""LoRA adapters on the linears: many adapters on one base model, mixed in one batch.

An adapted linear holds every adapter's A and B stacked, `a` [N, R, in] and `b` [out, N, R] (adapter
slot s at index s - 1; slot 0 is the base model), in the model dtype whatever format the base weights
are in, with the adapter's scale (alpha / r, or alpha / sqrt(r) with rsLoRA) folded into B. Smaller ranks are
padded with zeros, which changes nothing. A fused linear (q/k/v, gate/up) gives each of its shards
its own R / shards columns: its B is block-diagonal, so one product serves every shard.

A step's rows are grouped by adapter (`LoraBatch`: the rows of each adapter present, the segments
punica's SGMV kernel takes); for a prefill the linear adds x[rows] A^T B^T of each segment to
what its base method computed. A decode step's few rows instead take two products with every
adapter side by side, x [A_1; ...; A_N]^T, masked so that each row keeps its own adapter's
columns, then times [B_1 ... B_N]^T: four calls per linear whatever the number of adapters, each
adapter's weights read once. A step of the base model alone has no LoraBatch and pays nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

SIDE_BY_SIDE_ROWS = 64  # up to this many rows (decode): every adapter side by side; above: one product each


@dataclass(slots=True)
class LoraBatch:
    """segments: (adapter slot >= 1, rows of the flat batch that run with it), one per adapter
    present; slots: [T] every row's adapter slot (0: the base model)."""

    segments: list[tuple[int, torch.Tensor]]
    slots: torch.Tensor

    @classmethod
    def of_rows(cls, slots: list[int], device) -> LoraBatch | None:
        """From the adapter slot of every row; None when every row is the base model's."""
        rows: dict[int, list[int]] = {}
        for i, s in enumerate(slots):
            if s:
                rows.setdefault(s, []).append(i)
        if not rows:
            return None
        segments = [(s, torch.tensor(r, dtype=torch.int64, device=device)) for s, r in sorted(rows.items())]
        return cls(segments, torch.tensor(slots, dtype=torch.int64, device=device))

    def narrow(self, start: int, length: int) -> LoraBatch | None:
        """The rows start .. start + length, counted from start."""
        out = []
        for slot, rows in self.segments:
            inside = rows[(rows >= start) & (rows < start + length)] - start
            if inside.numel():
                out.append((slot, inside))
        return LoraBatch(out, self.slots[start : start + length]) if out else None


class LoraState:
    """The step's LoraBatch, shared by a model's adapted linears: set around each forward."""

    def __init__(self):
        self.batch: LoraBatch | None = None

    @contextmanager
    def rows(self, start: int, length: int):
        """Within: the linears see rows start .. start + length of the step alone (a layer that
        runs its rows in chunks, e.g. a long prefill's MLP)."""
        whole = self.batch
        self.batch = None if whole is None else whole.narrow(start, length)
        try:
            yield
        finally:
            self.batch = whole


class LoraWeights:
    """One linear's adapters (see the module docstring for the layout)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, state: LoraState):
        self.a, self.b, self.state = a, b, state
        n, r = a.shape[0], a.shape[1]
        self.a_wide = a.reshape(n * r, a.shape[2])  # [N * R, in]
        self.b_wide = b.reshape(b.shape[0], n * r)  # [out, N * R]
        self.owner = torch.arange(n * r, device=a.device) // r + 1  # the adapter slot of each column

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = self.state.batch
        if batch is None:
            return y
        if x.shape[0] <= SIDE_BY_SIDE_ROWS:  # decode: each row keeps its own adapter's columns
            xa = (x @ self.a_wide.T) * (batch.slots[:, None] == self.owner).to(x.dtype)
            return y.add_(xa @ self.b_wide.T)
        for slot, rows in batch.segments:
            y.index_add_(0, rows, (x.index_select(0, rows) @ self.a[slot - 1].T) @ self.b[:, slot - 1].T)
        return y

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes
