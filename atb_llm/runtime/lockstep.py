"""Serving at world size N: requests reach rank 0 only; the other ranks replay them.

Every rank runs the same deterministic scheduler (docs/ARCHITECTURE.md), so ranks agree as long as
each sees the same requests and aborts between the same steps. Rank 0's engine is wrapped in a
`Lockstep`, which records every add and abort and, before each step, broadcasts them (token ids,
sampling, the request id rank 0 gave, sibling, adapter); the other ranks run `follow`: apply what
came, step, wait for the next message, until rank 0 closes. The messages travel on a gloo group of
their own whose timeout is practically infinite, since an idle server sends nothing for hours; the
steps' own collectives keep the bounded timeout that ends a world with a lost rank.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from atb_llm.runtime.engine import LLMEngine
from atb_llm.runtime.sequence import SamplingParams, Sequence

IDLE = timedelta(days=365)


def control_group():
    """The group the step messages travel on; every rank creates it, in the same order."""
    return dist.new_group(backend="gloo", timeout=IDLE)


class Lockstep:
    """Rank 0's engine, as the server drives it: the same methods, plus `close()` to release the
    other ranks. Anything not named here is read from the engine itself."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._group = control_group()
        self._pending: list[tuple] = []

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        sibling_of: str | None = None,
        adapter: str | None = None,
    ) -> Sequence:
        seq = self.engine.add_request(prompt, params, request_id, sibling_of, adapter)  # refused: nothing to send
        self._pending.append(("add", seq.prompt_token_ids, seq.params, seq.request_id, sibling_of, adapter))
        return seq

    def add_prefilled(self, *args, **kwargs):
        raise NotImplementedError("a shared prefill is not replayed across tensor-parallel ranks; use add_request")

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._pending.append(("abort", request_id))

    def step(self) -> list[Sequence]:
        self._send(self._pending)
        self._pending = []
        return self.engine.step()

    def close(self) -> None:
        """End `follow` on the other ranks (after the step in flight, if any)."""
        self._send([("close",)])

    def _send(self, ops: list[tuple]) -> None:
        dist.broadcast_object_list([ops], src=0, group=self._group)


def follow(engine: LLMEngine) -> None:
    """The loop of every rank but 0: apply rank 0's adds and aborts, step with it; until it closes."""
    group = control_group()
    with torch.inference_mode():
        while True:
            message = [None]
            dist.broadcast_object_list(message, src=0, group=group)
            for op in message[0]:
                if op[0] == "close":
                    return
                if op[0] == "add":
                    ids, params, request_id, sibling_of, adapter = op[1:]
                    engine.add_request(ids, params, request_id, sibling_of, adapter)
                else:
                    engine.abort(op[1])
            engine.step()
