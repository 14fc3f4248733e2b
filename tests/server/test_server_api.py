"""The official openai client, unchanged, against the server on loopback (default model): chat and
completion, streaming and not, greedy text equal to run_pa's for the same prompt; stop strings;
/v1/models, /health and /metrics."""

import json

import httpx
import openai
import pytest
from server_util import metrics, running_server, wait_until

from atb_llm.entrypoints import run_pa

pytestmark = pytest.mark.timeout(900)  # loads the default model twice (server, run_pa)

QUESTION = "Write a Python function that checks whether a number is prime."
CODE_PROMPT = "def fibonacci(n):\n"
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def server(default_model):
    with running_server(default_model, max_batch_size=4, max_output_length=64) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def reference(default_model, tmp_path_factory):
    """run_pa's greedy answers: [0] the chat question, [1] the raw code prompt (one at a time)."""
    prompts = tmp_path_factory.mktemp("run_pa") / "prompts.jsonl"
    lines = [[{"role": "user", "content": QUESTION}], CODE_PROMPT]
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    args = ["--model_path", str(default_model), "--input_file", str(prompts), "--max_batch_size", "1"]
    return run_pa.main(args + ["--max_output_length", str(MAX_TOKENS)])


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == ["Qwen2.5-Coder-0.5B-Instruct"]
    assert client.models.retrieve("Qwen2.5-Coder-0.5B-Instruct").id == "Qwen2.5-Coder-0.5B-Instruct"
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "model": "Qwen2.5-Coder-0.5B-Instruct"}


def test_chat_matches_run_pa(server, client, reference):
    ref = reference[0]
    assert ref.text.strip()
    messages = [{"role": "user", "content": QUESTION}]
    out = client.chat.completions.create(
        model=server.model_name, messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.choices[0].finish_reason == ref.finish_reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ref.prompt_token_ids), len(ref.token_ids))
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    stream = client.chat.completions.create(
        model=server.model_name,
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert len(chunks) > 5  # token by token, not one blob
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_completion_matches_run_pa(server, client, reference):
    ref = reference[1]
    out = client.completions.create(model=server.model_name, prompt=CODE_PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert out.object == "text_completion"
    assert out.choices[0].text == ref.text and out.choices[0].finish_reason == ref.finish_reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ref.prompt_token_ids), len(ref.token_ids))

    stream = client.completions.create(
        model=server.model_name, prompt=CODE_PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)  # usage rides on the last chunk


def test_stop_string_cuts_streamed_and_whole_text_alike(server, client, reference):
    ref = reference[1].text
    stop = "\n"
    assert stop in ref.strip("\n")
    expected = ref[: ref.index(stop)]
    kw = dict(model=server.model_name, prompt=CODE_PROMPT, max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    out = client.completions.create(**kw)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (expected, "stop")
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert streamed == expected


def test_seeded_sampling_repeats(server, client):
    kw = dict(model=server.model_name, prompt=CODE_PROMPT, max_tokens=8, temperature=0.9, top_p=0.95, seed=7)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_metrics_count_requests_tokens_and_free_blocks(server, client):
    before = metrics(server.url)
    out = client.completions.create(model=server.model_name, prompt=CODE_PROMPT, max_tokens=3, temperature=0)
    wait_until(lambda: server.loop.stats.blocks_used == 0, 10, "blocks to be freed")
    after = metrics(server.url)
    finished = sum(after[k] - before[k] for k in after if k.startswith("atb_llm_requests_total"))
    assert finished == 1
    assert after["atb_llm_generation_tokens_total"] - before["atb_llm_generation_tokens_total"] == 3
    assert after["atb_llm_prompt_tokens_total"] - before["atb_llm_prompt_tokens_total"] == out.usage.prompt_tokens
    assert after["atb_llm_time_to_first_token_seconds_count"] == before["atb_llm_time_to_first_token_seconds_count"] + 1
    assert after['atb_llm_cache_blocks_used{pool="model",level="full"}'] == 0
    assert after['atb_llm_cache_bytes_used{pool="model"}'] == 0
    total = after['atb_llm_cache_bytes_total{pool="model"}']
    assert (
        after['atb_llm_cache_blocks_free{pool="model"}'] * server.loop.engine.cache_manager.bytes_per_block("model")
        == total
    )


def test_chat_logprobs_through_the_openai_client(server, client, reference):
    """logprobs / top_logprobs in the client's own types: one entry per generated token of the text,
    greedy tokens are their position's top alternative, streamed entries equal the whole answer's."""
    messages = [{"role": "user", "content": QUESTION}]
    kw = dict(model=server.model_name, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    out = client.chat.completions.create(**kw, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == len(reference[0].token_ids) - (reference[0].finish_reason == "stop")
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == t.logprob and t.logprob <= 0
        assert bytes(t.bytes).decode("utf-8", errors="replace") == t.token
    streamed = []
    for chunk in client.chat.completions.create(**kw, logprobs=True, top_logprobs=3, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-3)
