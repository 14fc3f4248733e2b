"""Option scoring on a tiny model: the engine's option log-probs (through its scheduler, several
prompts per batch) and the batched, left-padded transformers scorer both equal a direct
log-softmax over the last position of an unpadded full forward."""

import random

import pytest
import torch
from modeltest.scoring import best_option, encode_prompts, option_tokens, score_engine, score_hf, top_gap
from transformers import AutoModelForCausalLM, AutoTokenizer

from atb_llm.runtime.engine import EngineConfig, LLMEngine

OPTIONS = (" quick", " lazy", " fox", " dog")  # one token each in the tiny vocabulary


@pytest.fixture(scope="module")
def tiny(tiny_models):
    path = tiny_models()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 320) for _ in range(n)] for n in (5, 17, 1, 40, 33, 128, 129)]
    return path, tokenizer, model, prompts


def direct_logprobs(model, prompts, ids) -> list[list[float]]:
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([p])).logits[0, -1], -1)[list(ids)].tolist() for p in prompts]


def test_engine_option_logprobs_equal_full_forward(tiny):
    path, tokenizer, model, prompts = tiny
    ids = option_tokens(tokenizer, OPTIONS).ids
    cfg = EngineConfig(str(path), max_batch_size=3, max_input_length=160, max_output_length=1, block_size=16)
    engine = LLMEngine(cfg)
    seen = []
    got = score_engine(engine, prompts, ids, on_item=lambda i, lp: seen.append(i))
    want = direct_logprobs(model, prompts, ids)
    assert sorted(seen) == list(range(len(prompts)))  # every item reported once, 7 prompts in batches of 3
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)
    assert all(lp < 0 for row in got for lp in row)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_hf_left_padded_batches_equal_full_forward(tiny, batch_size):
    _, tokenizer, model, prompts = tiny
    ids = option_tokens(tokenizer, OPTIONS).ids
    got = score_hf(model, prompts, ids, batch_size)
    want = direct_logprobs(model, prompts, ids)
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)


def test_shared_prefix_goes_into_the_prompt(tiny):
    _, tokenizer, _, _ = tiny
    space = tokenizer.encode(" ", add_special_tokens=False)
    letters = option_tokens(tokenizer, (" A", " B", " C", " D"))  # " A" is a space token then "A" here
    assert letters.prefix == tuple(space) and letters.ids == tuple(tokenizer.convert_tokens_to_ids(list("ABCD")))
    assert option_tokens(tokenizer, tuple("ABCD")) == type(letters)((), letters.ids)
    assert encode_prompts(tokenizer, ["hello"], letters) == [tokenizer.encode("hello") + list(space)]
    with pytest.raises(ValueError, match=r"options \(' yes', ' no'\) encode to"):
        option_tokens(tokenizer, (" yes", " no"))


def test_best_option_and_gap():
    assert best_option([-2.0, -0.5, -0.5, -3.0]) == 1  # exact tie: the first
    assert top_gap([-2.0, -0.5, -0.5]) == 0.0 and top_gap([-1.0, -0.25]) == 0.75
