"""No request may hurt another. Each bad or hostile request below is sent while two greedy streams
and one seeded sampled stream run (the engine slowed so that they are surely in flight), and
those streams must give exactly the text they give alone (fp32 tiny model)."""

import json
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
from server_util import running_server

from atb_llm.entrypoints.openai.serve import parse_args
from atb_llm.runtime import sampler

pytestmark = pytest.mark.timeout(300)

MAX_INPUT, MAX_OUTPUT = 64, 48
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
STEP_DELAY_S = 0.015  # each forward: 48 tokens take about a second, so the streams outlive a bad request
STREAMS = [
    {"prompt": "hello world", "max_tokens": MAX_OUTPUT, "temperature": 0, "ignore_eos": True},
    {"prompt": "the quick brown fox", "max_tokens": MAX_OUTPUT, "temperature": 0, "ignore_eos": True},
    {"prompt": "def return", "max_tokens": MAX_OUTPUT, "temperature": 0.9, "seed": 7, "ignore_eos": True},
]


@pytest.fixture(scope="module")
def server(tiny_models):
    with running_server(
        tiny_models(chat=True), block_size=16, max_input_length=MAX_INPUT, max_output_length=MAX_OUTPUT
    ) as s:
        yield s


def stream_text(url: str, body: dict, first: threading.Event | None = None) -> str:
    text = []
    with httpx.stream("POST", url + COMPLETIONS, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text.append(chunk["choices"][0]["text"])
                if first is not None:
                    first.set()
    return "".join(text)


@pytest.fixture(scope="module")
def alone(server) -> list[str]:
    return [stream_text(server.url, body) for body in STREAMS]


@pytest.fixture
def slow_steps(server, monkeypatch):
    runner = server.loop.engine.runner
    forward = runner._forward

    def slow(batch):
        time.sleep(STEP_DELAY_S)
        return forward(batch)

    monkeypatch.setattr(runner, "_forward", slow)


@contextmanager
def streams_running(server, alone: list[str]):
    """Runs STREAMS in threads; the body runs once each has its first token, and must end before
    any of them does; then their texts must equal `alone`."""
    texts, firsts, errors = [None] * len(STREAMS), [threading.Event() for _ in STREAMS], []

    def run(i: int) -> None:
        try:
            texts[i] = stream_text(server.url, STREAMS[i], firsts[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            firsts[i].set()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(STREAMS))]
    for t in threads:
        t.start()
    assert all(f.wait(30) for f in firsts)
    yield
    assert all(t.is_alive() for t in threads), "a stream ended before the bad request did: no overlap was tested"
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert texts == alone


def post(server, route: str, body: dict | bytes, **headers) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + route, content=raw, headers={"content-type": "application/json", **headers})


def error_of(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    return err


OK = {"prompt": "hello", "max_tokens": 4}
# (id, route, body, status, code, words in the message)
REFUSED = [
    ("stop-id-past-vocab", COMPLETIONS, {**OK, "min_tokens": 1, "stop_token_ids": [999999]}, 422, "999999"),
    ("stop-id-2^63", COMPLETIONS, {**OK, "min_tokens": 1, "stop_token_ids": [2**63]}, 422, str(2**63)),
    ("stop-id-negative", COMPLETIONS, {**OK, "stop_token_ids": [-1]}, 422, "[0, 320)"),
    ("stop-ids-too-many", COMPLETIONS, {**OK, "stop_token_ids": [1] * 257}, 422, "at most 256"),
    ("tiny-repetition-penalty", COMPLETIONS, {**OK, "temperature": 1, "repetition_penalty": 1e-300}, 422, "1e-300"),
    ("prompt-id-past-vocab", COMPLETIONS, {**OK, "prompt": [1, 2, 320]}, 422, "320"),
]


@pytest.mark.parametrize("route,body,status,words", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_bad_values_are_refused_at_admission(server, alone, slow_steps, route, body, status, words):
    with streams_running(server, alone):
        err = error_of(post(server, route, body), status, "invalid_value")
    assert words in err["message"] and err["param"]


@pytest.mark.parametrize(
    "route,body",
    [
        (COMPLETIONS, {"prompt": "The capital of France is", "max_tokens": 1, "n": 2, "temperature": 0.8}),
        (CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "n": 2, "temperature": 0.8}),
        (COMPLETIONS, {"prompt": "hello world", "max_tokens": 1, "best_of": 3, "temperature": 0.8}),
    ],
    ids=["completions-n2", "chat-n2", "best_of3"],
)
def test_siblings_whose_first_sample_ends_at_its_first_token(server, alone, slow_steps, route, body):
    with streams_running(server, alone):
        for _ in range(8):
            r = post(server, route, body)
            assert r.status_code == 200, r.text
            choices = r.json()["choices"]
            assert len(choices) == body.get("n", 1) and {c["finish_reason"] for c in choices} == {"length"}


def test_siblings_stopped_by_a_stop_string_at_their_first_token(server, alone, slow_steps):
    first = post(server, COMPLETIONS, {"prompt": "hello", "max_tokens": 1, "temperature": 0}).json()
    word = first["choices"][0]["text"].strip()
    assert word, first
    with streams_running(server, alone):
        body = {"prompt": "hello", "max_tokens": 8, "n": 3, "temperature": 0, "stop": [word]}
        r = post(server, COMPLETIONS, body)
    assert r.status_code == 200, r.text
    assert [c["finish_reason"] for c in r.json()["choices"]] == ["stop"] * 3


def test_empty_chat_messages_are_counted_before_tokenizing(server, alone, slow_steps, monkeypatch):
    """50,000 messages without content (under the body limit) are refused by the template's size
    alone, before the chat template runs."""
    encoder = server.server.config.app.state.served.encoder
    assert encoder.message_tokens > 0
    monkeypatch.setattr(
        encoder, "_chat_ids", lambda messages: pytest.fail("ran the template on a chat that cannot fit")
    )
    body = {"messages": [{"role": "user"}] * 50_000, "max_tokens": 1}
    assert len(json.dumps(body)) < encoder.max_body_bytes()
    with streams_running(server, alone):
        for _ in range(3):
            err = error_of(post(server, CHAT, body), 413, "context_length_exceeded")
            assert "50000 messages take at least" in err["message"]
    n = MAX_INPUT // encoder.message_tokens + 1  # one message more than the template alone allows
    err = error_of(
        post(server, CHAT, {"messages": [{"role": "user"}] * n, "max_tokens": 1}), 413, "context_length_exceeded"
    )
    assert f"{n} messages" in err["message"]


def test_roles_count_toward_the_size(server):
    encoder = server.server.config.app.state.served.encoder
    chars = MAX_INPUT * encoder.max_token_chars
    body = {"messages": [{"role": "user", "content": "x" * (chars - 3)}], "max_tokens": 1}  # "user" tips it over
    err = error_of(post(server, CHAT, body), 413, "context_length_exceeded")
    assert f"the prompt has {chars + 1} characters" in err["message"]


def test_a_failure_inside_a_step_ends_that_request_alone(server, alone, slow_steps, monkeypatch):
    """Whatever still raises inside a step because of one request (here: its penalties, then its
    stop check) ends that request with a named error; the batch goes on, seeded samples included."""
    penalize = sampler.penalize

    def failing_penalize(logits, seq, eos):
        if seq.params.presence_penalty == 1.5:
            raise RuntimeError("simulated penalty failure")
        return penalize(logits, seq, eos)

    monkeypatch.setattr(sampler, "penalize", failing_penalize)
    detok = server.loop.engine.detokenizer
    finish_reason = detok.finish_reason

    def failing_finish(seq):
        if "boom" in seq.params.stop:
            raise RuntimeError("simulated stop check failure")
        return finish_reason(seq)

    monkeypatch.setattr(detok, "finish_reason", failing_finish)
    with streams_running(server, alone):
        err = error_of(post(server, COMPLETIONS, {**OK, "presence_penalty": 1.5}), 500, "request_failed")
        assert "simulated penalty failure" in err["message"]
        err = error_of(post(server, COMPLETIONS, {**OK, "stop": ["boom"]}), 500, "request_failed")
        assert "simulated stop check failure" in err["message"]
        with httpx.stream("POST", server.url + COMPLETIONS, json={**OK, "presence_penalty": 1.5, "stream": True}) as r:
            lines = [ln for ln in r.iter_lines() if ln]
        assert json.loads(lines[-2][6:])["error"]["code"] == "request_failed" and lines[-1] == "data: [DONE]"
    assert httpx.get(server.url + "/health").status_code == 200


def test_protocol_as_openai_clients_expect(server):
    nulls = {"temperature": None, "top_p": None, "n": None, "stop": None, "seed": None, "stream_options": None}
    r = post(server, COMPLETIONS, {**OK, **nulls, "max_tokens": None})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
    for field, value in [("n", "3"), ("max_tokens", "4"), ("stream", 1), ("temperature", "0"), ("n", 2.0)]:
        err = error_of(post(server, COMPLETIONS, {**OK, field: value}), 400, "invalid_type")
        assert err["param"] == field
    err = error_of(post(server, COMPLETIONS, {**OK, "model": "m" * 1_000_000}), 404, "model_not_found")
    assert len(err["message"]) < 300 and "1000002 characters" in err["message"]
    err = error_of(post(server, COMPLETIONS, {**OK, "temperature": "t" * 100_000}), 400, "invalid_type")
    assert len(err["message"]) < 300


@pytest.mark.parametrize(
    "raw",
    [b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b'{"prompt": "\xff\xfe"}', b'{"prompt": "hi"'],
    ids=["nested", "not-utf8", "truncated"],
)
def test_unreadable_bodies_get_a_code(server, raw):
    error_of(post(server, COMPLETIONS, raw), 400, "invalid_json")


def test_host_header_is_checked_without_an_api_key(server):
    err = error_of(post(server, COMPLETIONS, OK, host="rebind.example.com"), 400, "invalid_host")
    assert "--allowed_hosts" in err["message"]
    assert (
        post(server, COMPLETIONS, {**OK, "max_tokens": 1}, host=f"localhost:{server.url.rsplit(':', 1)[1]}").status_code
        == 200
    )
    assert httpx.get(server.url + "/health", headers={"host": "[::1]:80"}).status_code == 200


def test_empty_api_key_is_refused():
    with pytest.raises(SystemExit):
        parse_args(["--api_key", ""])
    assert parse_args(["--allowed_hosts", "box.lan"]).allowed_hosts == ["box.lan"]
