"""What a sequence's tokens mean to its client: when it stops (eos, stop tokens and strings,
length) and its text, cut before a stop string and without the final eos / stop token."""

from __future__ import annotations

from dataclasses import dataclass, field

from atb_llm.runtime.sequence import Sequence, TokenLogprob


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    ttft_s: float | None
    tpot_s: float | None
    num_preemptions: int = 0
    logprobs: list[dict[int, float]] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None  # why finish_reason is "error"


class Detokenizer:
    """Stop conditions and text of sequences, for one tokenizer and the model's eos ids."""

    def __init__(self, tokenizer, eos_token_ids: frozenset[int], max_seq_len: int):
        self.tokenizer, self.eos_token_ids, self.max_seq_len = tokenizer, eos_token_ids, max_seq_len

    def finish_reason(self, seq: Sequence) -> str | None:
        """stop | length after the sequence's last token, or None while it goes on."""
        p, tok = seq.params, seq.output_token_ids[-1]
        if (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            return "stop"
        if p.stop:  # search the uncut text: text_of already cuts before a stop string
            text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
            if any(s in text for s in p.stop):
                return "stop"
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_seq_len:
            return "length"
        return None

    def visible_tokens(self, seq: Sequence) -> list[int]:
        """The output tokens that make its text: all but a final eos / stop token."""
        ids = seq.output_token_ids
        stop_ids = self.eos_token_ids | set(seq.params.stop_token_ids)
        if seq.finish_reason == "stop" and ids and ids[-1] in stop_ids:
            return ids[:-1]
        return ids

    def text_of(self, seq: Sequence) -> str:
        """Decoded output, cut before a stop string, without the eos / stop token."""
        text = self.tokenizer.decode(self.visible_tokens(seq), skip_special_tokens=True)
        for s in seq.params.stop:
            i = text.find(s)
            if i >= 0:
                text = text[:i]
        return text

    def output(self, seq: Sequence) -> RequestOutput:
        return RequestOutput(
            seq.request_id,
            seq.prompt_token_ids,
            list(seq.output_token_ids),
            self.text_of(seq),
            seq.is_finished,
            seq.finish_reason,
            seq.time_to_first_token(),
            seq.time_per_output_token(),
            seq.num_preemptions,
            list(seq.logprobs),
            list(seq.output_logprobs),
            seq.prompt_logprobs,
            seq.error,
        )
