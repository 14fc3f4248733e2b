"""MLGC levels: how one attention-head group (one KV head of one layer) keeps its history.

A level is geometry over the group's *logical slots* (slot i lives in block i // block_size of the
group's block table, at offset i % block_size):

- which slot a token at position `pos` lands in, once its sequence is `n` tokens long
  (`slot_of`, -1 when the level does not keep it);
- how many slots, from slot 0, decode reads (`read_len`), and how many blocks that takes;
- for window levels, the compensation slot holding the mean K/V of the evicted middle, whose
  logit gets `+log(n_evicted)` (RazorAttention), so the evicted attention mass is approximated.

Keys are cached after RoPE at their original positions, so the order of slots does not matter
and eviction needs no re-rotation.

Each level also names its `Storage`: the model dtype, or int8 with a per-token fp32 scale (the
`_int8` variants keep the same geometry in the int8 pool). Storage says what a block costs and
how values are quantized; the cache and every backend read it from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class Storage:
    """How a pool holds K and V. `name` is the block pool the level's blocks come from."""

    name: str
    int8: bool

    def bytes_per_block(self, block_size: int, head_dim: int, dtype: torch.dtype) -> int:
        """K and V of one block (int8: codes plus one fp32 scale per token and tensor)."""
        if self.int8:
            return 2 * block_size * (head_dim + 4)
        return 2 * block_size * head_dim * torch.empty(0, dtype=dtype).element_size()

    @staticmethod
    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric per-token int8: x [N, D] -> (int8 [N, D], fp32 scale [N])."""
        x = x.float()
        scale = x.abs().amax(-1).clamp(min=1e-8) / 127.0
        return torch.round(x / scale[:, None]).to(torch.int8), scale  # |x| / scale <= 127 by construction

    @staticmethod
    def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """q [..., D] int8, scale [...] -> [..., D] in `dtype`."""
        return q.to(dtype) * scale.unsqueeze(-1).to(dtype)


MODEL_STORAGE = Storage("model", int8=False)
INT8_STORAGE = Storage("int8", int8=True)


@dataclass(frozen=True)
class Level:
    """Keeps every token (`full`). Subclasses override the geometry."""

    name: ClassVar[str] = "full"
    mark: ClassVar[str] = "F"  # in a plan's grid (see plan.describe)
    storage: ClassVar[Storage] = MODEL_STORAGE
    drops_tokens: ClassVar[bool] = False  # whether slot_of ever returns -1

    @property
    def comp_slot(self) -> int | None:
        """Logical slot of the compensation K/V, or None."""
        return None

    def slots_used(self, n: int) -> int:
        """Slots the group holds for a sequence of n tokens."""
        return n

    def blocks(self, n: int, block_size: int) -> int:
        return math.ceil(self.slots_used(n) / block_size)

    def read_len(self, n: torch.Tensor) -> torch.Tensor:
        """n: [B] sequence lengths -> [B] slots decode reads, from slot 0."""
        return n

    def slot_of(self, pos: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """pos, n: [T] token positions and their sequences' lengths -> [T] logical slots, -1 = dropped."""
        return pos

    def evicted(self, n: torch.Tensor) -> torch.Tensor:
        """n: [B] -> [B] tokens folded into the compensation slot."""
        return torch.zeros_like(n)

    @property
    def int8(self) -> bool:
        return self.storage.int8

    @property
    def pool(self) -> str:
        return self.storage.name

    def as_int8(self) -> Level:
        """The same geometry in int8 storage (the C8 KV cache)."""
        return self if self.int8 else FullInt8()

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class Window(Level):
    """Keeps the first `sink` tokens, the last `recent` in a ring, and one compensation slot.

    Slots: [0, sink) the sinks, `sink` the compensation, then a ring of `recent` slots. Token
    pos >= sink goes to ring slot sink + 1 + (pos - sink) % recent, so the token it overwrites
    is exactly the one leaving the window.
    """

    name: ClassVar[str] = "window"
    mark: ClassVar[str] = "W"
    drops_tokens: ClassVar[bool] = True
    sink: int = 64
    recent: int = 1024

    def __post_init__(self):
        if self.sink < 0 or self.recent < 1:
            raise ValueError(
                f"window level needs sink >= 0 and recent >= 1, got sink={self.sink}, recent={self.recent}"
            )

    @property
    def comp_slot(self) -> int:
        return self.sink

    @property
    def capacity(self) -> int:
        return self.sink + self.recent + 1

    def slots_used(self, n: int) -> int:
        return n if n <= self.sink else min(n + 1, self.capacity)

    def read_len(self, n: torch.Tensor) -> torch.Tensor:
        return torch.where(n <= self.sink, n, (n + 1).clamp(max=self.capacity))

    def slot_of(self, pos: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        ring = self.sink + 1 + (pos - self.sink) % self.recent
        kept = torch.where(pos < n - self.recent, torch.full_like(pos, -1), ring)
        return torch.where(pos < self.sink, pos, kept)

    def evicted(self, n: torch.Tensor) -> torch.Tensor:
        return (n - self.sink - self.recent).clamp(min=0)

    def as_int8(self) -> Level:
        return self if self.int8 else WindowInt8(sink=self.sink, recent=self.recent)

    def comp_bias(self, n: torch.Tensor) -> torch.Tensor:
        """n: [B] -> [B] fp32 logit bias of the compensation slot: log(n_evicted), -inf while none."""
        e = self.evicted(n).to(torch.float32)
        return torch.where(e > 0, e.clamp(min=1).log(), float("-inf"))

    def fold(self, comp: torch.Tensor, evicted_before: int, leaving: torch.Tensor) -> torch.Tensor:
        """Compensation after a prefill chunk: comp [..., D] fp32, the mean of the `evicted_before`
        tokens folded so far (ignored while 0); leaving [m, ..., D] the tokens this chunk evicts
        (ring tokens it overwrites, then its own tokens that fall out) -> the fp32 mean of all
        evicted_before + m. A whole prompt is the case evicted_before = 0."""
        total = leaving.float().sum(0)
        if evicted_before:
            total = total + comp * evicted_before
        return total / (evicted_before + leaving.shape[0])

    @staticmethod
    def fold_token(comp: torch.Tensor, old: torch.Tensor, evicted: torch.Tensor) -> torch.Tensor:
        """Running mean in decode: comp, old [N, D] fp32 (compensation, token leaving the ring),
        evicted [N, 1] tokens evicted counting `old`. The slot holds nothing before the first."""
        return torch.where(evicted == 1, old, comp + (old - comp) / evicted)

    def describe(self) -> str:
        return f"{self.name}(sink={self.sink}, recent={self.recent})"


@dataclass(frozen=True)
class FullInt8(Level):
    name: ClassVar[str] = "full_int8"
    mark: ClassVar[str] = "f"
    storage: ClassVar[Storage] = INT8_STORAGE


@dataclass(frozen=True)
class WindowInt8(Window):
    name: ClassVar[str] = "window_int8"
    mark: ClassVar[str] = "w"
    storage: ClassVar[Storage] = INT8_STORAGE


LEVELS: dict[str, type[Level]] = {cls.name: cls for cls in (Level, Window, FullInt8, WindowInt8)}


def make_level(name: str, sink: int = 64, recent: int = 1024) -> Level:
    try:
        cls = LEVELS[name]
    except KeyError:
        raise ValueError(f"unknown MLGC level {name!r}; levels are {sorted(LEVELS)}") from None
    return cls(sink=sink, recent=recent) if issubclass(cls, Window) else cls()
