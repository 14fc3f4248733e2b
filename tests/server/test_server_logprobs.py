"""Log-probabilities through the server, in the shapes lm-eval and the OpenAI client read: echo with
the prompt's log-probabilities (lm-eval's loglikelihood request: token-id prompts in a batch, echo,
logprobs=1, max_tokens=1), scoring alone (max_tokens 0), and streamed completions. Values are
checked against Hugging Face transformers on the tiny model in fp32."""

import json

import httpx
import pytest
import torch
from server_util import running_server

pytestmark = pytest.mark.timeout(300)

COMPLETIONS = "/v1/completions"
PROMPTS = [[5, 17, 300, 42, 9], [77, 100, 3, 8, 250, 11, 12]]


@pytest.fixture(scope="module")
def server(tiny):
    with running_server(tiny, dtype="fp32", block_size=16, max_input_length=32, max_output_length=8) as s:
        yield s


@pytest.fixture(scope="module")
def hf(tiny):
    """ids -> [len(ids), V] log-softmax of transformers' logits (row j predicts token j + 1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)

    def logprobs(ids):
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)

    return logprobs


def test_lm_eval_loglikelihood_request(server, hf):
    """What lm-eval's local-completions sends for loglikelihood, and what its parse_logprobs reads:
    sum(token_logprobs[ctxlen:-1]) and whether each of those tokens was the top one."""
    body = {"model": server.model_name, "prompt": PROMPTS, "temperature": 0, "max_tokens": 1}
    r = httpx.post(server.url + COMPLETIONS, json={**body, "logprobs": 1, "echo": True, "seed": 1234}, timeout=60)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for ids, choice in zip(PROMPTS, choices):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        ref = hf(ids)
        want = [ref[j, ids[j + 1]].item() for j in range(len(ids) - 1)]
        assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(want, abs=1e-4)
        ctxlen = 2  # the continuation: prompt tokens 2.. (lm-eval scores context + continuation in one prompt)
        assert sum(lp["token_logprobs"][ctxlen:-1]) == pytest.approx(sum(want[ctxlen - 1 :]), abs=1e-3)
        for j in range(1, len(ids)):  # top-1 alternative: the most likely token at that position
            ((text, value),) = lp["top_logprobs"][j].items()
            assert value == pytest.approx(ref[j - 1].max().item(), abs=1e-4)
        greedy = ref[-1].argmax().item()  # the generated token, greedy
        assert lp["token_logprobs"][-1] == pytest.approx(ref[-1, greedy].item(), abs=1e-4)
        assert choice["text"].startswith(server_text(server, ids))
        assert lp["text_offset"][0] == 0 and lp["text_offset"][1] == len(lp["tokens"][0])
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == sum(map(len, PROMPTS)) and usage["completion_tokens"] == 2


def server_text(server, ids):
    return server.server.config.app.state.served.texts.join(ids)


def test_score_only_with_max_tokens_0(server, hf):
    ids = PROMPTS[1]
    body = {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}
    r = httpx.post(server.url + COMPLETIONS, json=body, timeout=60).json()
    (choice,) = r["choices"]
    assert choice["text"] == server_text(server, ids) and r["usage"]["completion_tokens"] == 0
    assert len(choice["logprobs"]["token_logprobs"]) == len(ids)
    assert choice["logprobs"]["top_logprobs"][1:] == [{}] * (len(ids) - 1)
    ref = hf(ids)
    assert choice["logprobs"]["token_logprobs"][-1] == pytest.approx(ref[-2, ids[-1]].item(), abs=1e-4)


def test_streamed_logprobs_cover_the_text(server):
    body = {"prompt": PROMPTS[0], "max_tokens": 6, "ignore_eos": True, "logprobs": 2, "temperature": 0}
    whole = httpx.post(server.url + COMPLETIONS, json=body, timeout=60).json()["choices"][0]
    tokens, offsets, values, text = [], [], [], ""
    with httpx.stream("POST", server.url + COMPLETIONS, json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                if choice["logprobs"]:
                    tokens += choice["logprobs"]["tokens"]
                    offsets += choice["logprobs"]["text_offset"]
                    values += choice["logprobs"]["token_logprobs"]
    assert text == whole["text"] and len(tokens) == 6
    assert tokens == whole["logprobs"]["tokens"] and offsets == whole["logprobs"]["text_offset"]
    assert values == pytest.approx(whole["logprobs"]["token_logprobs"], abs=1e-5)
    assert all(len(top) <= 2 for top in whole["logprobs"]["top_logprobs"])


def test_penalties_min_tokens_and_stop_token_ids_reach_the_engine(server, tiny):
    """The API's values give the engine's own answer for the same SamplingParams."""
    from atb_llm.runtime.engine import EngineConfig, LLMEngine
    from atb_llm.runtime.sequence import SamplingParams

    cfg = EngineConfig(str(tiny), dtype="fp32", block_size=16, max_input_length=32, max_output_length=8, progress=False)
    engine = LLMEngine(cfg)
    plain = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    cases = [
        dict(frequency_penalty=1.5, presence_penalty=0.5),
        dict(repetition_penalty=1.8),
        dict(min_tokens=8, stop_token_ids=[plain[0]]),
        dict(stop_token_ids=[plain[2]], ignore_eos=True),
    ]
    for extra in cases:
        body = {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, **extra}
        got = httpx.post(server.url + COMPLETIONS, json=body, timeout=60).json()
        params = SamplingParams(max_tokens=8, **{k: tuple(v) if isinstance(v, list) else v for k, v in extra.items()})
        (want,) = engine.generate([PROMPTS[0]], params)
        assert got["choices"][0]["text"] == want.text, extra
        assert got["choices"][0]["finish_reason"] == want.finish_reason
        assert got["usage"]["completion_tokens"] == len(want.token_ids)
    assert want.finish_reason == "stop" and len(want.token_ids) == plain.index(plain[2]) + 1
