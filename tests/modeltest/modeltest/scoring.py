"""Option scoring: the log-probability of each option's token right after the prompt (full
log-softmax over the vocabulary at the last prompt token; one prefill per item), through the
engine's scheduler or through Hugging Face transformers. The predicted option is the most
likely one; on an exact tie, the first."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from atb_llm.runtime.engine import LLMEngine
from atb_llm.runtime.sequence import SamplingParams

OnItem = Callable[[int, list[float]], None]  # (item index, option log-probs) as each item finishes


@dataclass(frozen=True)
class OptionTokens:
    """prefix: tokens that every option starts with, appended to each prompt (a lone space token in
    a vocabulary without " A"); ids: the one token per option that follows."""

    prefix: tuple[int, ...]
    ids: tuple[int, ...]


def option_tokens(tokenizer, options: tuple[str, ...]) -> OptionTokens:
    encoded = [tokenizer.encode(o, add_special_tokens=False) for o in options]
    n = 0
    while all(len(e) > n + 1 for e in encoded) and len({e[n] for e in encoded}) == 1:
        n += 1
    ids = [e[n:] for e in encoded]
    if any(len(t) != 1 for t in ids) or len({t[0] for t in ids}) != len(ids):
        raise ValueError(
            f"options {options} encode to {encoded}; scoring needs them to differ in exactly one token "
            "after a shared prefix"
        )
    return OptionTokens(tuple(encoded[0][:n]), tuple(t[0] for t in ids))


def encode_prompts(tokenizer, prompts: list[str], options: OptionTokens) -> list[list[int]]:
    return [tokenizer.encode(p, add_special_tokens=False) + list(options.prefix) for p in prompts]


def best_option(logprobs: list[float]) -> int:
    return max(range(len(logprobs)), key=lambda i: (logprobs[i], -i))


def top_gap(logprobs: list[float]) -> float:
    """Log-prob of the best option minus the second best (0 on a tie)."""
    first, second = sorted(logprobs, reverse=True)[:2]
    return first - second


def score_engine(
    engine: LLMEngine,
    prompts: list[list[int]],
    option_ids: tuple[int, ...],
    on_item: OnItem | None = None,
    adapter: str | None = None,
) -> list[list[float]]:
    """Every prompt becomes a one-token request (with the LoRA `adapter`, if any); the scheduler
    batches them (continuous batching up to the engine's max_batch_size) until all are done.
    Returns [item][option] log-probs."""
    params = SamplingParams(max_tokens=1, logprob_token_ids=option_ids)
    index = {engine.add_request(ids, params, adapter=adapter).seq_id: i for i, ids in enumerate(prompts)}
    out: list[list[float]] = [[] for _ in prompts]
    while engine.has_unfinished():
        for seq in engine.step():
            if seq.is_finished:
                i = index[seq.seq_id]
                out[i] = [seq.logprobs[0][t] for t in option_ids]
                if on_item:
                    on_item(i, out[i])
    return out


@torch.inference_mode()
def score_hf(
    model, prompts: list[list[int]], option_ids: tuple[int, ...], batch_size: int, on_item: OnItem | None = None
) -> list[list[float]]:
    """Hugging Face forward over left-padded batches (prompts of similar length together), with an
    attention mask and positions counted from each prompt's first real token; logits at the last
    position only. Returns [item][option] log-probs."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[float]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        device = model.device
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            logits_to_keep=1,
        ).logits[:, -1]
        lp = torch.log_softmax(logits.float(), dim=-1)[:, list(option_ids)].tolist()
        for row, i in enumerate(chunk):
            out[i] = lp[row]
            if on_item:
                on_item(i, out[i])
    return out
