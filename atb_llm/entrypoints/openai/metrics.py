"""Prometheus text metrics: requests, tokens, latency histograms, and cache blocks per pool and level
(`level` is the MLGC level of the groups holding the blocks: full, window, full_int8, window_int8).

Counters are written by the engine thread (and the HTTP error handler) under a lock; the cache
figures come from the `LLMEngine.stats()` snapshot the engine thread replaces after every step, so
`/metrics` never reads the engine itself.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter

from atb_llm.runtime.stats import EngineStats

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            total += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.finished: Counter[str] = Counter()
        self.by_adapter: Counter[str] = Counter()  # finished requests per LoRA adapter ("base": none)
        self.errors: Counter[int] = Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)

    def observe_first_token(self, ttft_s: float | None) -> None:
        if ttft_s is not None:
            with self._lock:
                self.ttft.observe(ttft_s)

    def observe_finished(
        self, reason: str, prompt_tokens: int, output_tokens: int, tpot_s: float | None, adapter: str = "base"
    ) -> None:
        with self._lock:
            self.finished[reason] += 1
            self.by_adapter[adapter] += 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += output_tokens
            if tpot_s is not None:
                self.tpot.observe(tpot_s)

    def observe_error(self, status: int) -> None:
        with self._lock:
            self.errors[status] += 1

    def render(self, stats: EngineStats) -> str:
        with self._lock:
            lines = _counter_lines(self, stats)
            lines += _histogram_block("atb_llm_time_to_first_token_seconds", "Time to first token.", self.ttft)
            lines += _histogram_block(
                "atb_llm_time_per_output_token_seconds", "Mean time per output token after the first.", self.tpot
            )
        return "\n".join(lines + _cache_lines(stats)) + "\n"


def _header(name: str, kind: str, doc: str) -> list[str]:
    return [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]


def _counter_lines(m: Metrics, stats: EngineStats) -> list[str]:
    lines = _header("atb_llm_requests_total", "counter", "Finished requests by finish reason.")
    for reason in sorted(set(m.finished) | {"stop", "length", "abort", "error"}):
        lines.append(f'atb_llm_requests_total{{finish_reason="{reason}"}} {m.finished[reason]}')
    lines += _header("atb_llm_adapter_requests_total", "counter", "Finished requests by LoRA adapter (base: none).")
    lines += [f'atb_llm_adapter_requests_total{{adapter="{a}"}} {n}' for a, n in sorted(m.by_adapter.items())]
    lines += _header("atb_llm_request_errors_total", "counter", "Requests rejected with an HTTP error.")
    lines += [f'atb_llm_request_errors_total{{status="{s}"}} {n}' for s, n in sorted(m.errors.items())]
    lines += _header("atb_llm_requests_running", "gauge", "Sequences in the running batch.")
    lines.append(f"atb_llm_requests_running {stats.running}")
    lines += _header("atb_llm_requests_waiting", "gauge", "Sequences waiting for a batch slot or cache blocks.")
    lines.append(f"atb_llm_requests_waiting {stats.waiting}")
    lines += _header("atb_llm_preemptions_total", "counter", "Sequences preempted for cache blocks (recomputed later).")
    lines.append(f"atb_llm_preemptions_total {stats.preemptions}")
    lines += _header("atb_llm_prompt_tokens_total", "counter", "Prompt tokens of finished requests.")
    lines.append(f"atb_llm_prompt_tokens_total {m.prompt_tokens}")
    lines += _header("atb_llm_generation_tokens_total", "counter", "Generated tokens of finished requests.")
    lines.append(f"atb_llm_generation_tokens_total {m.generation_tokens}")
    return lines


def _histogram_block(name: str, doc: str, hist: Histogram) -> list[str]:
    return _header(name, "histogram", doc) + hist.lines(name)


def _cache_lines(stats: EngineStats) -> list[str]:
    per_level = [
        ("atb_llm_cache_groups", "Attention-head groups (KV head x layer) kept at each compression level.", "groups"),
        ("atb_llm_cache_blocks_used", "KV cache blocks in use, per pool and compression level.", "blocks_used"),
        ("atb_llm_cache_blocks_peak", "Most KV cache blocks in use at once, per pool and level.", "blocks_peak"),
    ]
    lines = []
    for name, doc, key in per_level:
        lines += _header(name, "gauge", doc)
        for (pool, level), row in sorted(stats.levels.items()):
            lines.append(f'{name}{{pool="{pool}",level="{level}"}} {row[key]}')
    per_pool = [
        ("atb_llm_cache_blocks_free", "KV cache blocks free, per pool.", "blocks_free"),
        ("atb_llm_cache_bytes_used", "KV cache bytes in use, per pool.", "bytes_used"),
        ("atb_llm_cache_bytes_total", "KV cache bytes allocated, per pool.", "bytes_total"),
    ]
    for name, doc, key in per_pool:
        lines += _header(name, "gauge", doc)
        lines += [f'{name}{{pool="{pool}"}} {usage[key]}' for pool, usage in sorted(stats.pools.items())]
    if stats.prefix is not None:
        queries, hits, blocks = stats.prefix
        lines += _header(
            "atb_llm_prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache."
        )
        lines.append(f"atb_llm_prefix_cache_queries_total {queries}")
        lines += _header("atb_llm_prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.")
        lines.append(f"atb_llm_prefix_cache_hits_total {hits}")
        lines += _header("atb_llm_prefix_cache_blocks", "gauge", "Blocks holding cached prefixes (in use or idle).")
        lines.append(f"atb_llm_prefix_cache_blocks {blocks}")
    if stats.speculation is not None:
        proposed, accepted, verified = stats.speculation
        for name, value, doc in (
            (
                "atb_llm_spec_proposed_tokens_total",
                proposed,
                "Tokens proposed for verification (speculative decoding).",
            ),
            ("atb_llm_spec_accepted_tokens_total", accepted, "Proposed tokens the target accepted."),
            ("atb_llm_spec_verify_steps_total", verified, "Verify steps, counted once per sequence."),
        ):
            lines += _header(name, "counter", doc)
            lines.append(f"{name} {value}")
        lines += _header("atb_llm_spec_acceptance_rate", "gauge", "Accepted over proposed tokens since start.")
        lines.append(f"atb_llm_spec_acceptance_rate {stats.acceptance_rate or 0.0:.6f}")
        lines += _header("atb_llm_spec_mean_accepted_length", "gauge", "Tokens a verify step gives a sequence, mean.")
        lines.append(f"atb_llm_spec_mean_accepted_length {stats.mean_accepted or 0.0:.6f}")
    return lines
