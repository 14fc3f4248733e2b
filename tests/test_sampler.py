import pytest
import torch

from atb_llm.runtime.sampler import Sampler, _filter
from atb_llm.runtime.sequence import SamplingParams, Sequence


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0])
    out = _filter(logits, top_k=2, top_p=1.0)
    assert torch.isinf(out[[0, 2]]).all() and out[1] == 5 and out[3] == 4


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    out = _filter(probs.log(), top_k=0, top_p=0.75)  # 0.5 + 0.3 reaches 0.75
    assert torch.isfinite(out[:2]).all() and torch.isinf(out[2:]).all()
    # top_p = 1 keeps every token, even one whose share rounds away in the cumulative sum
    logits = torch.tensor([10.0, 0.0, -30.0, -60.0])
    assert torch.equal(_filter(logits, top_k=0, top_p=1.0), logits)
    # a top_p that float32 rounds to 0 (found by the schema fuzzing) keeps the most likely token alone
    for tiny in (5e-324, 1e-50):
        out = _filter(torch.tensor([0.0, 2.0, 1.0]), top_k=0, top_p=tiny)
        assert torch.isfinite(out).tolist() == [False, True, False]


def test_greedy_and_seeded_sampling():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    assert Sampler()(logits, [Sequence([1], SamplingParams())]) == [int(logits[0].argmax())]

    def draws(seed):
        seq = Sequence([1], SamplingParams(temperature=1.0, seed=seed))
        return [Sampler()(logits, [seq])[0] for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert len(set(draws(7))) > 1  # it samples, not argmax


def test_logprobs_of_requested_tokens():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    seq = Sequence([1], SamplingParams(logprob_token_ids=(0, 2)))
    (lp,) = Sampler.logprobs(logits, [seq], [2])
    ref = torch.log_softmax(logits[0], -1)
    assert lp == {0: ref[0].item(), 2: ref[2].item()}


def test_forced_tokens_are_emitted_with_their_logprobs():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    seq = Sequence([1], SamplingParams(force_tokens=(0, 1)))
    assert seq.params.max_tokens == 2 and seq.params.ignore_eos
    tokens = Sampler()(logits, [seq])
    assert tokens == [0]
    assert Sampler.logprobs(logits, [seq], tokens) == [{0: torch.log_softmax(logits[0], -1)[0].item()}]


@pytest.mark.parametrize("rp", [1.3, 2.0, 0.5])
def test_penalties_follow_openai_and_transformers(rp):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from atb_llm.runtime.sampler import penalize

    torch.manual_seed(0)
    logits = torch.randn(50)
    seq = Sequence([3, 4, 4], SamplingParams(repetition_penalty=rp))
    seq.output_token_ids = [7, 7, 9, 3]
    ids = torch.tensor([seq.token_ids])
    want = RepetitionPenaltyLogitsProcessor(rp)(ids, logits[None].clone())[0]  # the library's own
    assert torch.allclose(penalize(logits, seq, frozenset()), want)
    assert not torch.allclose(want, logits)
    seq.params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    got = penalize(logits, seq, frozenset())  # outputs only: 7 twice, 9 and 3 once; prompt tokens not
    want = logits.clone()
    want[7] -= 0.5 + 2 * 0.25
    want[9] -= 0.5 + 0.25
    want[3] -= 0.5 + 0.25
    assert torch.allclose(got, want)
    seq.output_token_ids = []  # the first token: nothing generated, nothing to penalize
    assert torch.equal(penalize(logits, seq, frozenset()), logits)


def test_min_tokens_holds_back_eos_and_stop_tokens():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])  # eos (1) and a stop token (2) are the most likely
    seq = Sequence([0], SamplingParams(min_tokens=2, max_tokens=4, stop_token_ids=(2,)))
    sampler = Sampler(frozenset({1}))
    assert sampler(logits, [seq]) == [3]
    seq.output_token_ids = [3, 3]
    assert sampler(logits, [seq]) == [1]


def test_penalties_apply_per_sequence_in_a_batch():
    """Each row gets its own request's penalties; the logits the caller keeps stay raw."""
    logits = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0]])
    raw = logits.clone()
    a = Sequence([1], SamplingParams(frequency_penalty=1.0))
    a.output_token_ids = [0]
    b = Sequence([1], SamplingParams())
    b.output_token_ids = [0]
    assert Sampler()(logits, [a, b]) == [1, 0]
    assert torch.equal(logits, raw)


def test_sampled_tokens_follow_the_distribution():
    """The exponential race picks token i with probability p_i: 4000 unseeded rows in one batch,
    each token's share within 0.03 of softmax(logits / T), for T = 1 and 0.5 and under top-k 2
    (renormalised over the two kept tokens)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    torch.manual_seed(0)
    for temperature, top_k in ((1.0, 0), (0.5, 0), (1.0, 2)):
        seqs = [Sequence([1], SamplingParams(temperature=temperature, top_k=top_k)) for _ in range(4000)]
        tokens = Sampler()(logits.expand(4000, -1), seqs)
        share = torch.bincount(torch.tensor(tokens), minlength=4).float() / 4000
        want = _filter(logits / temperature, top_k, 1.0).softmax(-1)
        assert (share - want).abs().max() < 0.03, (temperature, top_k, share, want)


# ---- sampling order -------------------------------------------------------------------------------
def sample_many(temperature: float, top_p: float, n: int = 300) -> set[int]:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    seen = set()
    for seed in range(n):
        seq = Sequence([1], SamplingParams(temperature=temperature, top_p=top_p, seed=seed))
        seen.add(Sampler()(logits, [seq])[0])
    return seen


def test_temperature_applies_before_top_p():
    """At temperature 0.5 token 0 has p = e^4 / (e^4 + e^2 + 1 + e^-2) = 0.865 >= 0.8: the nucleus is
    token 0 alone. Filtered first at temperature 1 (p0 = 0.644) the nucleus would also hold token 1."""
    assert sample_many(0.5, 0.8) == {0}
    assert sample_many(0.5, 0.9) == {0, 1}  # 0.865 < 0.9: token 1 joins, so the test above can fail
