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
