"""The one admission check (RequestLimits): every bound accepted exactly at its value and refused one
past it, as a property over limits and requests drawn around the bounds."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atb_llm.runtime.request_limits import MAX_STOP_TOKEN_IDS, ContextLengthError, RequestError, RequestLimits, short
from atb_llm.runtime.sequence import SamplingParams

LIMITS = RequestLimits(max_input_length=8, max_output_length=6, vocab_size=100, max_sequence_tokens=12)


@st.composite
def limits_and_request(draw):
    vocab = draw(st.integers(1, 50))
    max_in, max_out = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    longest = draw(st.integers(1, max_in + max_out))
    limits = RequestLimits(max_in, max_out, vocab, longest)
    n = draw(st.integers(0, max_in + 2))
    near = st.integers(-2, vocab + 2) | st.integers(0, vocab - 1)
    ids = draw(st.lists(near, min_size=n, max_size=n))
    stop_ids = draw(st.lists(near, max_size=3))
    max_tokens = draw(st.integers(1, max_out + 2))
    return limits, ids, SamplingParams(max_tokens=max_tokens, stop_token_ids=tuple(stop_ids))


@settings(max_examples=400, deadline=None)
@given(limits_and_request())
def test_accepted_exactly_when_every_bound_holds(case):
    limits, ids, params = case
    in_vocab = all(0 <= t < limits.vocab_size for t in ids + list(params.stop_token_ids))
    too_long = len(ids) > limits.max_input_length or len(ids) + params.max_tokens > limits.max_sequence_tokens
    ok = 0 < len(ids) and in_vocab and params.max_tokens <= limits.max_output_length and not too_long
    try:
        limits.check(ids, params)
    except ContextLengthError:
        assert too_long and not ok
    except RequestError as e:
        assert not ok and e.param in ("prompt", "max_tokens", "stop_token_ids")
    else:
        assert ok


@pytest.mark.parametrize(
    "ids, kw, error, words",
    [
        ([1] * 8, dict(max_tokens=4), None, ""),  # prompt at max_input_length, sequence at 12
        ([1] * 9, dict(max_tokens=1), ContextLengthError, "9 tokens, more than max_input_length=8"),
        ([1] * 6, dict(max_tokens=6), None, ""),  # max_tokens at max_output_length
        ([1] * 6, dict(max_tokens=7), RequestError, "max_tokens=7 exceeds max_output_length=6"),
        ([1] * 7, dict(max_tokens=6), ContextLengthError, "= 13 tokens; the KV cache holds at most 12"),
        ([], dict(), RequestError, "the prompt is empty"),
        ([0, 99], dict(max_tokens=1), None, ""),  # the vocabulary's first and last ids
        ([100], dict(max_tokens=1), RequestError, "prompt has token id(s) outside the vocabulary [0, 100): 100"),
        ([-1], dict(max_tokens=1), RequestError, "-1"),
        ([1], dict(max_tokens=1, stop_token_ids=(99,) * MAX_STOP_TOKEN_IDS), None, ""),
        ([1], dict(max_tokens=1, stop_token_ids=(1,) * (MAX_STOP_TOKEN_IDS + 1)), RequestError, "at most 256"),
        ([1], dict(max_tokens=1, stop_token_ids=(2**63,)), RequestError, "stop_token_ids has token id(s)"),
        ([1], dict(force_tokens=(5, 100)), RequestError, "force_tokens has token id(s)"),
        ([1], dict(max_tokens=1, logprob_token_ids=(100,)), RequestError, "logprob_token_ids"),
    ],
)
def test_bounds_at_and_past(ids, kw, error, words):
    params = SamplingParams(**kw)
    if error is None:
        LIMITS.check(ids, params)
        return
    with pytest.raises(error) as info:
        LIMITS.check(ids, params)
    assert words in str(info.value) and type(info.value) is error


def test_errors_quote_a_short_prefix():
    assert short("x" * 10) == repr("x" * 10)
    cut = short("y" * 1000)
    assert len(cut) < 70 and cut.endswith("(1002 characters)")
    with pytest.raises(RequestError) as info:
        LIMITS.check([10**400], SamplingParams(max_tokens=1))
    assert len(str(info.value)) < 200
