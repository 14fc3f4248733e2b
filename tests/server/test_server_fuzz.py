"""Schema fuzzing: schemathesis generates requests from the server's own OpenAPI schema (valid and
invalid bodies, boundary values, wrong types) and sends them to a live server on loopback, while a
greedy stream runs. No request may get a 5xx; every error is OpenAI-shaped with a code and quotes
at most a short prefix of what was sent; the stream gives the text it gives alone."""

import json
import threading

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from server_util import running_server, wait_until

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

MAX_EXAMPLES = 300  # per POST operation (20 per GET): about 1.5 minutes here
STREAM = {"prompt": "hello world", "max_tokens": 32, "temperature": 0, "ignore_eos": True, "stream": True}
SENT = {"requests": 0, "status": {}}


@pytest.fixture(scope="module")
def server(tiny_models):
    with running_server(tiny_models(chat=True), block_size=16, max_input_length=64, max_output_length=32) as s:
        yield s


def stream_text(url: str) -> str:
    with httpx.stream("POST", url + "/v1/completions", json=STREAM, timeout=60) as r:
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    return "".join(c["choices"][0]["text"] for c in chunks)


@pytest.fixture
def background_stream(server):
    """A greedy stream repeated for as long as the fuzzing runs; every run must equal the first."""
    alone, texts, stop = stream_text(server.url), [], threading.Event()

    def run():
        while not stop.is_set():
            texts.append(stream_text(server.url))

    thread = threading.Thread(target=run)
    thread.start()
    yield
    stop.set()
    thread.join(60)
    assert texts and all(t == alone for t in texts), (alone, texts[:3])


def check_error_shape(case, response) -> None:
    SENT["requests"] += 1
    SENT["status"][response.status_code] = SENT["status"].get(response.status_code, 0) + 1
    assert response.status_code < 500, (case.method, case.path, str(case.body)[:300], response.text[:500])
    if response.status_code < 400:
        return
    error = response.json()["error"]
    assert error["code"] and isinstance(error["code"], str), error
    assert error["type"] == "invalid_request_error" and error["message"], error
    assert len(error["message"]) < 1000, error["message"][:200]


def test_no_request_gets_a_5xx_or_a_shapeless_error(server, background_stream):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions"}
    for op in operations:
        examples = MAX_EXAMPLES if op.method.upper() == "POST" else 20

        @given(op.as_strategy())
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            response = case.call(timeout=60)
            check_error_shape(case, response)

        fuzz()


def test_report_fuzzing_totals(server):
    """Runs after the fuzzing (file order): it sent requests to every route, and left the cache empty."""
    print(f"\nschemathesis sent {SENT['requests']} requests; statuses {dict(sorted(SENT['status'].items()))}")
    assert SENT["requests"] >= MAX_EXAMPLES and any(s >= 400 for s in SENT["status"])
    wait_until(lambda: server.loop.stats.blocks_used == 0, 30, "every block to be free")
