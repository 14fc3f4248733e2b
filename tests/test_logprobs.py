"""Log-probabilities as OpenAI reports them: of every prompt token (computed in the prefill) and of
every generated token, with the top-k alternatives, checked against Hugging Face transformers (fp32)."""

import pytest
import torch

from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams

PROMPT = [5, 17, 300, 42, 9, 77, 100, 3]


@pytest.fixture(scope="module")
def engine(tiny):
    cfg = EngineConfig(str(tiny), dtype="fp32", block_size=16, max_input_length=64, max_output_length=8, progress=False)
    return LLMEngine(cfg)


@pytest.fixture(scope="module")
def hf_logprobs(tiny):
    """[len(PROMPT) + 4, V] log-softmax of transformers' logits over the prompt and its greedy continuation."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    with torch.no_grad():
        gen = model.generate(torch.tensor([PROMPT]), max_new_tokens=4, do_sample=False, min_new_tokens=4)
        logits = model(gen).logits[0]
    return gen[0].tolist(), torch.log_softmax(logits, -1)


def test_prompt_and_output_logprobs_equal_transformers(engine, hf_logprobs):
    ids, ref = hf_logprobs
    params = SamplingParams(max_tokens=4, ignore_eos=True, logprobs=3, prompt_logprobs=5)
    (out,) = engine.generate([PROMPT], params)
    assert out.token_ids == ids[len(PROMPT) :]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(PROMPT)
    scored = out.prompt_logprobs[1:] + out.output_logprobs  # position j predicts token j + 1
    assert [lp.token_id for lp in scored] == ids[1:]
    for j, lp in enumerate(scored):
        assert lp.logprob == pytest.approx(ref[j, ids[j + 1]].item(), abs=1e-4)
        k = 5 if j < len(PROMPT) - 1 else 3
        values, indices = ref[j].topk(k)
        assert [t for t, _ in lp.top] == indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)
    for lp in out.output_logprobs:  # greedy: the chosen token is the most likely one
        assert lp.top[0] == (lp.token_id, lp.logprob)


def test_runner_logits_are_the_last_positions_logits(engine, hf_logprobs):
    """ModelRunner.logits: one fp32 row per sequence, its next-token logits (two prompts, one batch)."""
    ids, ref = hf_logprobs
    for prompt in (PROMPT, PROMPT[:3]):
        engine.add_request(prompt, SamplingParams(max_tokens=1))
    seqs, is_prefill = engine.scheduler.schedule()
    logits = engine.runner.logits(seqs, is_prefill)
    for seq in seqs:
        engine.abort(seq.request_id)
    assert is_prefill and logits.shape == (2, ref.shape[1]) and logits.dtype == torch.float32
    assert torch.allclose(torch.log_softmax(logits[0], -1), ref[len(PROMPT) - 1], atol=1e-4)
    assert torch.allclose(torch.log_softmax(logits[1], -1), ref[2], atol=1e-4)


def test_scoring_one_request_does_not_change_its_batch(engine):
    plain = SamplingParams(max_tokens=6, ignore_eos=True)
    alone = engine.generate([[7, 8, 9, 10]], plain)[0].token_ids
    scored, other = engine.generate(
        [PROMPT, [7, 8, 9, 10]], [SamplingParams(max_tokens=6, ignore_eos=True, prompt_logprobs=0, logprobs=0), plain]
    )
    assert other.token_ids == alone and other.prompt_logprobs is None and other.output_logprobs == []
    assert len(scored.prompt_logprobs) == len(PROMPT) and all(lp.top == [] for lp in scored.prompt_logprobs[1:])
    assert len(scored.output_logprobs) == 6


def test_one_token_prompt_has_one_empty_entry(engine):
    (out,) = engine.generate([[5]], SamplingParams(max_tokens=1, prompt_logprobs=1))
    assert out.prompt_logprobs == [None]


@pytest.mark.parametrize("k", [-1, 21])
def test_logprobs_count_is_bounded(k):
    with pytest.raises(ValueError, match=rf"logprobs={k} must be in \[0, 20\]"):
        SamplingParams(logprobs=k)


def test_prompt_logprobs_past_one_chunk_equal_transformers(tiny):
    """A prompt longer than LOGPROB_CHUNK (256 rows per log-softmax) gets every position scored, each
    against its own token, in the second chunk as in the first."""
    from transformers import AutoModelForCausalLM

    from atb_llm.runtime.sampler import LOGPROB_CHUNK

    prompt = [(7 * i + 3) % 317 + 2 for i in range(LOGPROB_CHUNK + 44)]
    cfg = EngineConfig(
        str(tiny), dtype="fp32", block_size=16, max_input_length=512, max_output_length=1, progress=False
    )
    (out,) = LLMEngine(cfg).generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0))
    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0], -1)
    scored = out.prompt_logprobs[1:]
    assert len(scored) == len(prompt) - 1 and [lp.token_id for lp in scored] == prompt[1:]
    want = [ref[j, prompt[j + 1]].item() for j in range(len(prompt) - 1)]
    assert [lp.logprob for lp in scored] == pytest.approx(want, abs=1e-4)
