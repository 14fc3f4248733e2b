"""Every bad request gets its status and an OpenAI-style JSON error naming the problem; none is a 500,
and the server keeps serving. Tiny random model: the errors do not depend on the model."""

import json
import threading
import time

import httpx
import openai
import pytest
from server_util import metrics, running_server, wait_until

pytestmark = pytest.mark.timeout(300)

MAX_INPUT, MAX_OUTPUT = 16, 32
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
OK = {"prompt": "hello world", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_models):
    with running_server(tiny_models(), block_size=16, max_input_length=MAX_INPUT, max_output_length=MAX_OUTPUT) as s:
        yield s


# (route, body (dict, or raw bytes), status, code, param, words in the message)
CASES = [
    (COMPLETIONS, b'{"prompt": "hi",', 400, "invalid_json", None, "not valid JSON"),
    (COMPLETIONS, b"[1, 2]", 400, "invalid_body", None, "must be a JSON object"),
    (COMPLETIONS, b"", 400, "invalid_body", None, "no body"),
    (CHAT, {"model": "tiny"}, 400, "missing_field", "messages", "'messages' is required"),
    (CHAT, {"messages": "hi"}, 400, "invalid_type", "messages", "valid list"),
    (COMPLETIONS, {**OK, "prompt": 5}, 400, "invalid_type", "prompt", "expected one of str, list[str], list[int]"),
    (COMPLETIONS, {**OK, "temperature": "hot"}, 400, "invalid_type", "temperature", "temperature='hot'"),
    (COMPLETIONS, {**OK, "model": "gpt-4o"}, 404, "model_not_found", "model", "'gpt-4o' does not exist"),
    (CHAT, {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found", "model", ""),
    (COMPLETIONS, {**OK, "prompt": "hello " * 40}, 413, "context_length_exceeded", "prompt", "max_input_length=16"),
    (COMPLETIONS, {**OK, "prompt": list(range(17))}, 413, "context_length_exceeded", "prompt", "17 tokens"),
    (COMPLETIONS, {**OK, "temperature": -0.5}, 422, "invalid_value", "temperature", "temperature=-0.5"),
    (COMPLETIONS, {**OK, "temperature": 2.5}, 422, "invalid_value", "temperature", "less than or equal to 2"),
    (COMPLETIONS, {**OK, "top_p": 0}, 422, "invalid_value", "top_p", "greater than 0"),
    (COMPLETIONS, {**OK, "top_k": -1}, 422, "invalid_value", "top_k", "top_k=-1"),
    (COMPLETIONS, {**OK, "n": 17}, 422, "invalid_value", "n", "less than or equal to 16"),
    (COMPLETIONS, {**OK, "n": 3, "best_of": 2}, 422, "invalid_value", "best_of", "best_of=2 must be at least n=3"),
    (
        COMPLETIONS,
        {**OK, "best_of": 2, "stream": True},
        400,
        "unsupported_parameter",
        "best_of",
        "stream with best_of=2",
    ),
    (COMPLETIONS, {**OK, "max_tokens": 0}, 422, "invalid_value", "max_tokens", "max_tokens=0"),
    (COMPLETIONS, {**OK, "max_tokens": 33}, 422, "invalid_value", "max_tokens", "max_output_length=32"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 99},
        422,
        "invalid_value",
        "",
        "99",
    ),
    (COMPLETIONS, {**OK, "stop": ["a", "b", "c", "d", "e"]}, 422, "invalid_value", "stop", "at most 4"),
    (COMPLETIONS, {**OK, "presence_penalty": 2.5}, 422, "invalid_value", "presence_penalty", "less than or equal to 2"),
    (COMPLETIONS, {**OK, "repetition_penalty": 0}, 422, "invalid_value", "repetition_penalty", "[0.01, 100.0]"),
    (COMPLETIONS, {**OK, "min_tokens": 5}, 422, "invalid_value", "", "min_tokens=5 must be in [0, max_tokens=4]"),
    (COMPLETIONS, {**OK, "prompt": ["a", "b"], "stream": True}, 422, "invalid_value", "prompt", "stream takes one"),
    (COMPLETIONS, {**OK, "prompt": ["a"] * 17}, 422, "invalid_value", "prompt", "at most 16"),
    (COMPLETIONS, {**OK, "max_tokens": 0}, 422, "invalid_value", "max_tokens", "max_tokens=0 returns nothing"),
    (COMPLETIONS, {**OK, "logprobs": 21}, 422, "invalid_value", "logprobs", "less than or equal to 20"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
        422,
        "invalid_value",
        "top_logprobs",
        "needs logprobs=true",
    ),
    (COMPLETIONS, {**OK, "prompt": ""}, 422, "invalid_value", "prompt", "the prompt is empty"),
    (COMPLETIONS, {**OK, "prompt": [5, 999]}, 422, "invalid_value", "prompt", "outside the vocabulary"),
    (CHAT, {"messages": []}, 422, "invalid_value", "messages", "at least 1 item"),
    (CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, 422, "invalid_value", "messages.0.role", "'robot'"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}]}, 422, "invalid_value", "messages", "no chat template"),
    (COMPLETIONS, {**OK, "temperature": 0.7, "seed": 2**64}, 422, "invalid_value", "", "seed=18446744073709551616"),
    (COMPLETIONS, b'{"prompt": "a\\ud800b", "max_tokens": 2}', 400, "invalid_text", "prompt", "lone UTF-16 surrogate"),
    (
        CHAT,
        b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
        400,
        "invalid_text",
        "messages.0.content",
        "at character 0",
    ),
    (COMPLETIONS, {**OK, "suffix": "x"}, 400, "unsupported_parameter", "suffix", "suffix is not supported"),
    (COMPLETIONS, {**OK, "logit_bias": {"5": 100}}, 400, "unsupported_parameter", "logit_bias", "leave it out"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "hi"}], "best_of": 3},
        400,
        "unsupported_parameter",
        "best_of",
        "",
    ),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
        400,
        "unsupported_parameter",
        "response_format",
        "response_format is not supported",
    ),
]


@pytest.mark.parametrize(
    "route,body,status,code,param,words", CASES, ids=[f"{c[2]}-{c[3]}-{i}" for i, c in enumerate(CASES)]
)
def test_bad_request_gets_status_and_json(server, route, body, status, code, param, words):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + route, content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param
    assert words in err["message"]


def test_unknown_route_and_method(server):
    r = httpx.get(server.url + "/v1/nothing")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
    r = httpx.get(server.url + COMPLETIONS)
    assert r.status_code == 405 and "Method Not Allowed" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/models/other-model")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found")


def test_openai_client_raises_the_matching_errors(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        client.completions.create(model=server.model_name, prompt="hi", max_tokens=2, temperature=-1)
    with pytest.raises(openai.APIStatusError, match="max_input_length") as info:
        client.completions.create(model=server.model_name, prompt="hello " * 40, max_tokens=2, stream=True)
    assert info.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="'messages' is required"):
        client.post("/chat/completions", body={"model": server.model_name}, cast_to=object)


def test_server_keeps_serving_and_never_500s(server):
    for _, body, *_ in CASES:  # each bad request once more, then a good one
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        httpx.post(server.url + COMPLETIONS, content=raw, headers={"content-type": "application/json"})
    r = httpx.post(server.url + COMPLETIONS, json={**OK, "ignore_eos": True}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    m = metrics(server.url)
    assert m.get('atb_llm_request_errors_total{status="500"}', 0) == 0
    assert m['atb_llm_request_errors_total{status="413"}'] >= 2
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_engine_failure_stops_the_engine_cleanly(tiny_models, monkeypatch):
    """A step that fails for no one request's reason (here: the forward) ends every stream with an
    error event (503, code shutting_down), and the server then refuses work and fails its health
    check instead of serving from a cache in an unknown state."""
    with running_server(tiny_models(), block_size=16, max_input_length=MAX_INPUT, max_output_length=MAX_OUTPUT) as s:
        runner = s.loop.engine.runner

        def failing_forward(batch):
            raise RuntimeError("simulated device error")

        monkeypatch.setattr(runner, "_forward", failing_forward)
        with httpx.stream("POST", s.url + COMPLETIONS, json={**OK, "stream": True}, timeout=30) as r:
            lines = [ln for ln in r.iter_lines() if ln]
        assert r.status_code == 200
        error = json.loads(lines[-2].removeprefix("data: "))["error"]
        assert error["code"] == "shutting_down" and "simulated device error" in error["message"]
        assert lines[-1] == "data: [DONE]"
        wait_until(lambda: not s.loop.alive, 10, "the engine thread to stop")
        r = httpx.post(s.url + COMPLETIONS, json=OK, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert "RuntimeError: simulated device error" in r.json()["error"]["message"]
        assert httpx.get(s.url + "/health").status_code == 503


def test_neutral_values_of_unsupported_fields_are_accepted(server):
    body = {**OK, "suffix": None, "logit_bias": {}, "best_of": 1, "response_format": {"type": "text"}}
    assert httpx.post(server.url + COMPLETIONS, json=body, timeout=30).status_code == 200


def encoder(server):
    return server.server.config.app.state.served.encoder


def test_body_and_prompt_size_are_bounded_before_tokenizing(server, monkeypatch):
    enc = encoder(server)
    monkeypatch.setattr(enc, "_tokenize", lambda prompt: pytest.fail("tokenized a prompt that cannot fit"))
    limit = enc.max_body_bytes()
    t0 = time.monotonic()
    r = httpx.post(server.url + COMPLETIONS, json={**OK, "prompt": "x" * (limit + 10)}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    assert f"over the limit of {limit} bytes" in r.json()["error"]["message"]
    chunks = [b'{"prompt": "'] + [b"x" * 2**16] * (limit // 2**16 + 1) + [b'"}']  # no Content-Length: counted
    r = httpx.post(server.url + COMPLETIONS, content=iter(chunks), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    chars = MAX_INPUT * enc.max_token_chars + 1  # under the body limit, over what 16 tokens can hold
    r = httpx.post(server.url + COMPLETIONS, json={**OK, "prompt": "x" * chars}, timeout=60)
    assert r.status_code == 413 and f"the prompt has {chars} characters" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 10


def stream_time(url: str, body: dict) -> tuple[float, str]:
    """Stream one completion -> (seconds from sending to [DONE], finish reason)."""
    t0, finish = time.monotonic(), None
    with httpx.stream("POST", url + COMPLETIONS, json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
    return time.monotonic() - t0, finish


def test_slow_tokenization_and_bad_requests_leave_other_streams_alone(server, monkeypatch):
    """Tokenizing happens off the engine thread: while one prompt takes 3 s to tokenize, another
    request streams its whole answer. Requests refused up front (an out-of-range seed, a lone
    surrogate) and one with a tiny temperature (sampled greedily) do not touch it either."""
    enc, real = encoder(server), encoder(server)._tokenize

    def slow(prompt):
        if prompt == "slow":
            time.sleep(3)
        return real(prompt)

    monkeypatch.setattr(enc, "_tokenize", slow)
    others = [
        ({**OK, "prompt": "slow"}, 200),
        ({**OK, "temperature": 0.7, "seed": 2**64}, 422),
        ({**OK, "temperature": 1e-40, "max_tokens": 3, "ignore_eos": True}, 200),
    ]
    responses = [None] * len(others)

    def send(i):
        responses[i] = httpx.post(server.url + COMPLETIONS, json=others[i][0], timeout=60)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(others))]
    for t in threads:
        t.start()
    time.sleep(0.5)  # the slow prompt is being tokenized now
    elapsed, finish = stream_time(server.url, {"prompt": "hello", "max_tokens": MAX_OUTPUT, "ignore_eos": True})
    for t in threads:
        t.join(60)
    assert [r.status_code for r in responses] == [s for _, s in others]
    assert finish == "length" and elapsed < 2.0
    greedy = httpx.post(server.url + COMPLETIONS, json={**OK, "max_tokens": 3, "ignore_eos": True}, timeout=30)
    assert responses[2].json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


def test_a_prompt_of_exactly_max_input_length_is_served(server):
    """The bound itself is allowed: MAX_INPUT tokens are served, one more is refused."""
    body = {"prompt": list(range(2, 2 + MAX_INPUT)), "max_tokens": 2, "temperature": 0}
    r = httpx.post(server.url + COMPLETIONS, json=body, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == MAX_INPUT, r.text
    r = httpx.post(server.url + COMPLETIONS, json={**body, "prompt": list(range(2, 3 + MAX_INPUT))}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "context_length_exceeded"
