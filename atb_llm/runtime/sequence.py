"""A request as the engine sees it: its tokens, sampling parameters, block tables and timings."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum, auto

from atb_llm.cache.block_table import BlockTable
from atb_llm.runtime.request_limits import RequestError


@dataclass
class TokenLogprob:
    """A token's log-probability under the model's raw distribution (before temperature and
    filtering, as OpenAI and vLLM report it), and the `top` k most likely tokens there, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class SamplingParams:
    """temperature 0 is greedy. `logprob_token_ids` asks for the log-probabilities of these
    tokens at every generated position (option scoring). `force_tokens` makes the sequence emit
    exactly these tokens (teacher forcing) and records each one's log-probability: perplexity
    through the engine's own (possibly compressed) cache. `logprobs` = k records each generated
    token's log-probability with the k most likely alternatives (0: none); `prompt_logprobs` = k
    does the same for every prompt token after the first, computed in the prefill itself.
    Penalties as OpenAI and vLLM define them: `presence_penalty` / `frequency_penalty` subtract
    from the logit of every token generated so far (once / per occurrence); `repetition_penalty`
    divides positive and multiplies negative logits of every token of prompt and output (as
    transformers does). `min_tokens`: eos and `stop_token_ids` are not sampled before that many."""

    MAX_LOGPROBS = 20  # alternatives per position, as OpenAI's top_logprobs
    GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (dividing by them overflows)
    SEED_RANGE = 2**64  # seeds are unsigned 64-bit, as torch.Generator takes them
    REPETITION_RANGE = (0.01, 100.0)  # beyond it logits / penalty leave float32's range (inf, then nan)

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    logprob_token_ids: tuple[int, ...] = ()
    force_tokens: tuple[int, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0

    def __post_init__(self):
        self.force_tokens = tuple(self.force_tokens)
        if self.force_tokens:
            self.max_tokens, self.ignore_eos = len(self.force_tokens), True
        for name, ok, rule in (
            ("max_tokens", self.max_tokens >= 1, "must be at least 1"),
            ("temperature", self.temperature >= 0, "must be >= 0 (0 is greedy)"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 disables it)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("repetition_penalty", self.REPETITION_RANGE[0] <= self.repetition_penalty <= self.REPETITION_RANGE[1],
             f"must be in [{self.REPETITION_RANGE[0]}, {self.REPETITION_RANGE[1]}] (1 disables it)"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, f"must be in [0, max_tokens={self.max_tokens}]"),
        ):  # fmt: skip
            if not ok:
                raise RequestError(f"{name}={getattr(self, name)} {rule}", name)
        if self.seed is not None and not 0 <= self.seed < self.SEED_RANGE:
            raise RequestError(f"seed={self.seed} is outside [0, 2**64 - 1]; use a non-negative 64-bit seed", "seed")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= self.MAX_LOGPROBS:
                raise RequestError(f"{name}={k} must be in [0, {self.MAX_LOGPROBS}] (alternatives per token)", name)
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)
        self.stop_token_ids = tuple(self.stop_token_ids)
        self.logprob_token_ids = tuple(self.logprob_token_ids)

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1 or self.min_tokens)


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    adapter: int = 0  # the LoRA adapter's slot in the model (0: the base model)
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    block_table: BlockTable = field(default_factory=BlockTable)  # the blocks it holds, per group
    num_computed_tokens: int = 0  # tokens whose K/V the cache holds
    num_cached_tokens: int = 0  # prompt tokens the prefix cache had at its (last) admission
    num_scheduled_tokens: int = 0  # tokens this step computes (set by the scheduler; 0 = all the rest)
    snapshot_at: int = 0  # prefix caching: copy the window groups' blocks once this many are computed
    fork_at: int = 0  # n > 1: hand copies of the cache to the siblings once this many are computed
    logprobs: list[dict[int, float]] = field(default_factory=list)  # of params.logprob_token_ids, per step
    output_logprobs: list[TokenLogprob] = field(default_factory=list)  # with params.logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with params.prompt_logprobs; [0] is None
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    generator: object = None  # torch.Generator for seeded sampling, made by the sampler
    error: str | None = None  # why the sequence finished with reason "error"
    speculation: object = None  # a verify step's proposal and rows (cache.block_manager.Speculation), this step only

    def __post_init__(self):
        self.request_id = self.request_id or f"req-{self.seq_id}"

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens not yet in the cache: 1 while decoding (the last sampled), more while prefilling."""
        return self.num_tokens - self.num_computed_tokens

    def step_span(self, is_prefill: bool) -> tuple[int, int]:
        """(first position, tokens) a step computes: in prefill the scheduled chunk after the cached
        tokens (all the rest if none was scheduled), in decode the last token."""
        if not is_prefill:
            return self.num_tokens - 1, 1
        return self.num_computed_tokens, self.num_scheduled_tokens or self.num_tokens - self.num_computed_tokens

    def fail(self, error: BaseException | str) -> None:
        """Record why this sequence alone cannot go on (it then finishes with reason "error")."""
        self.error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    def time_per_output_token(self) -> float | None:
        """Mean seconds per output token after the first."""
        n = len(self.output_token_ids)
        if n < 2 or self.first_token_time is None:
            return None
        end = self.finish_time or time.perf_counter()
        return (end - self.first_token_time) / (n - 1)
