"""Next-token choice per sequence: greedy, or temperature / top-k / top-p sampling with an
optional per-request seed; plus log-probabilities of requested tokens (option scoring)."""

from __future__ import annotations

import torch

from atb_llm.runtime.sequence import Sequence, TokenLogprob

LOGPROB_CHUNK = 256  # rows per log-softmax when scoring a prompt: bounds the [rows, vocab] temporaries


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: [V] -> same, with tokens outside top-k / the top-p nucleus set to -inf."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        drop[0] = False  # and the most likely token, whatever top_p rounds to in float32 (5e-324 is 0)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def _probs(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """[V] temperature, top-k and top-p applied, softmaxed; makes a seeded request's generator once."""
    p = seq.params
    if p.seed is not None and seq.generator is None:
        seq.generator = torch.Generator(device=logits.device).manual_seed(p.seed)
    return _filter(logits / p.temperature, p.top_k, p.top_p).softmax(-1)


def _race(probs: torch.Tensor, generator) -> torch.Tensor:
    """The exponential race: argmax of p / E, E ~ Exp(1) per token, picks token i with probability p_i."""
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax()


def penalize(logits: torch.Tensor, seq: Sequence, eos_token_ids: frozenset[int]) -> torch.Tensor:
    """One sequence's logits [V] with its penalties and min_tokens applied (a new tensor)."""
    p, logits = seq.params, logits.clone()
    if p.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
        out = torch.tensor(seq.output_token_ids, device=logits.device)
        counts = torch.bincount(out, minlength=logits.numel()).to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    if len(seq.output_token_ids) < p.min_tokens:
        banned = sorted((eos_token_ids | set(p.stop_token_ids)) - {None})
        logits[banned] = float("-inf")
    return logits


class Sampler:
    def __init__(self, eos_token_ids: frozenset[int] = frozenset()):
        self.eos_token_ids = frozenset(eos_token_ids)  # what min_tokens holds back

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int | None]:
        """logits: [B, V] fp32 -> one token id per sequence. A sequence whose sampling fails (say, its
        logits are not finite) gets None and its `error` set; the others are not affected. Penalties
        change the choice, not the logits the caller keeps (log-probabilities stay raw).

        Every choice is made on the logits' device and the tokens come to the host in one transfer
        per step: sampled rows draw by the exponential race (argmax of p / E, E ~ Exp(1) per token,
        which picks token i with probability p_i), from the request's own generator when seeded."""
        if any(s.params.penalized for s in seqs):
            rows = [
                penalize(logits[i], s, self.eos_token_ids) if s.params.penalized else logits[i]
                for i, s in enumerate(seqs)
            ]
            logits = torch.stack(rows)
        chosen = logits.argmax(-1)
        drawn = [not s.params.force_tokens and s.params.temperature >= s.params.GREEDY_BELOW for s in seqs]
        if any(drawn):
            chosen = torch.stack(
                [self._draw(logits[i], s) if d else chosen[i] for i, (s, d) in enumerate(zip(seqs, drawn))]
            )
        tokens: list[int | None] = chosen.tolist()  # the step's one device-to-host transfer
        for i, seq in enumerate(seqs):
            if seq.params.force_tokens:
                tokens[i] = seq.params.force_tokens[len(seq.output_token_ids)]
            elif tokens[i] < 0:
                tokens[i], seq.error = None, "sampling failed: the probabilities are not finite (nan or inf logits)"
        return tokens

    @staticmethod
    def _draw(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
        """One sampled token id of one sequence, as a 0-d tensor on the logits' device; -1 where the
        filtered distribution is not finite."""
        probs = _probs(logits, seq)
        token = _race(probs, seq.generator)
        return torch.where(torch.isfinite(probs).all(), token, -1)

    def distribution(self, logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
        """[V] the probabilities one sequence samples its next token from (penalties, min_tokens,
        temperature, top-k, top-p), for a proposal's acceptance test (atb_llm.runtime.speculative)."""
        return _probs(penalize(logits, seq, self.eos_token_ids) if seq.params.penalized else logits, seq)

    @staticmethod
    def draw(probs: torch.Tensor, seq: Sequence) -> int | None:
        """A token drawn from `probs` [V] as `__call__` draws (the request's generator when seeded);
        None, with seq.error set, when they are not finite."""
        if not bool(torch.isfinite(probs).all()):
            seq.error = "sampling failed: the probabilities are not finite (nan or inf logits)"
            return None
        return int(_race(probs, seq.generator))

    @staticmethod
    def logprobs(logits: torch.Tensor, seqs: list[Sequence], tokens: list[int | None]) -> list[dict[int, float] | None]:
        """Log-softmax of the raw logits at the requested token ids (and at the forced token), per sequence."""
        wanted = {
            i: list(s.params.logprob_token_ids) + ([tokens[i]] if s.params.force_tokens else [])
            for i, s in enumerate(seqs)
            if tokens[i] is not None
        }
        wanted = {i: ids for i, ids in wanted.items() if ids}
        out: list[dict[int, float] | None] = [None] * len(seqs)
        if wanted:
            rows = list(wanted)
            lp = torch.log_softmax(logits[rows], dim=-1)
            for r, i in enumerate(rows):
                out[i] = dict(zip(wanted[i], lp[r, wanted[i]].tolist()))
        return out


def token_logprobs(logits: torch.Tensor, token_ids: list[int], k: int) -> list[TokenLogprob]:
    """logits [n, V] and the n tokens that followed -> each token's log-probability and the top k."""
    out = []
    for start in range(0, len(token_ids), LOGPROB_CHUNK):
        lp = torch.log_softmax(logits[start : start + LOGPROB_CHUNK].float(), dim=-1)
        ids = torch.tensor(token_ids[start : start + LOGPROB_CHUNK], device=lp.device)
        chosen = lp.gather(1, ids[:, None])[:, 0].tolist()
        values, indices = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        for t, c, v, i in zip(ids.tolist(), chosen, values.tolist(), indices.tolist()):
            out.append(TokenLogprob(t, c, list(zip(i, v))))
    return out
