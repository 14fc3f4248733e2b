"""--api_key (401 without it, as vLLM's), preemptions in /metrics, and a max_model_len in /v1/models
that reflects what the cache can hold. Tiny model."""

import threading

import httpx
import openai
import pytest
from server_util import free_port, metrics

from atb_llm.entrypoints.openai.serve import ServerThread
from atb_llm.runtime.engine import EngineConfig

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tiny_models):
    # 32 blocks of 16 for 4 groups: one sequence holds at most 128 tokens (the limits allow 216)
    cfg = EngineConfig(
        str(tiny_models()), block_size=16, max_input_length=16, max_output_length=200, num_blocks=32,
        max_batch_size=4, progress=False,
    )  # fmt: skip
    s = ServerThread.start(cfg, free_port(), api_key="sesame")
    yield s
    s.stop()


def test_v1_routes_need_the_key(server):
    body = {"prompt": "hello", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
        r = httpx.post(server.url + "/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200 and httpx.get(server.url + "/").status_code == 200
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sesame", max_retries=0)
    assert client.completions.create(model=server.model_name, prompt="hello", max_tokens=2).usage.completion_tokens
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert metrics(server.url)['atb_llm_request_errors_total{status="401"}'] >= 4


def test_max_model_len_is_what_the_cache_holds(server):
    card = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer sesame"}).json()["data"][0]
    assert card["max_model_len"] == 128


def test_preemptions_are_counted(server):
    """Four 100-token answers need 4 x 7 blocks each; the pool has 32: sequences step aside."""
    headers = {"Authorization": "Bearer sesame"}
    body = {"prompt": "hello world", "max_tokens": 100, "ignore_eos": True, "temperature": 0}
    replies = []

    def ask():
        replies.append(httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=120))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r.status_code for r in replies] == [200] * 4
    assert len({r.json()["choices"][0]["text"] for r in replies}) == 1  # greedy: preemption changes nothing
    assert metrics(server.url)["atb_llm_preemptions_total"] > 0
