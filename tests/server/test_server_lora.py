"""LoRA adapters through the server (tiny model): /v1/models lists the base and every adapter,
`model` picks one on both endpoints, requests of different adapters run together and each gets
what the engine gives it alone, /metrics counts requests per adapter, an unknown name is a 404."""

import concurrent.futures

import httpx
import openai
import pytest
from server_util import metrics, running_server
from tiny import make_adapter

from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams

PROMPT = "hello world the quick brown fox"
ENGINE = dict(block_size=16, max_input_length=64, max_output_length=16, dtype="fp32")


@pytest.fixture(scope="module")
def loras(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("server_loras")
    return {"l1": str(make_adapter(tiny, root / "l1", seed=1)), "l2": str(make_adapter(tiny, root / "l2", seed=2))}


@pytest.fixture(scope="module")
def server(tiny, loras):
    with running_server(tiny, lora_modules=loras, max_batch_size=8, **ENGINE) as s:
        yield s


def test_models_lists_the_base_and_every_adapter(server, loras):
    cards = httpx.get(server.url + "/v1/models").json()["data"]
    base = cards[0]["id"]
    assert [c["id"] for c in cards] == [base, "l1", "l2"]
    assert [c["parent"] for c in cards] == [None, base, base] and cards[1]["root"] == loras["l1"]
    assert httpx.get(server.url + "/v1/models/l2").json()["parent"] == base
    r = httpx.post(server.url + "/v1/completions", json=dict(model="l3", prompt=PROMPT, max_tokens=2))
    assert r.status_code == 404 and "model 'l3' does not exist" in r.json()["error"]["message"]
    assert "'l1', 'l2'" in r.json()["error"]["message"]


def test_each_request_runs_with_its_adapter_in_one_batch(server, tiny, loras):
    engine = LLMEngine(EngineConfig(str(tiny), lora_modules=loras, progress=False, **ENGINE))
    ids = engine.encode(PROMPT)
    want = {
        name: engine.tokenizer.decode(engine.generate([ids], SamplingParams(max_tokens=10), adapters=[a])[0].token_ids)
        for name, a in (("base", None), ("l1", "l1"), ("l2", "l2"))
    }
    assert len(set(want.values())) == 3
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    base = client.models.list().data[0].id
    before = metrics(server.url)
    names = [base, "l1", "l2"] * 3

    def ask(name):
        out = client.completions.create(model=name, prompt=PROMPT, max_tokens=10, temperature=0)
        return out.model, out.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        got = list(pool.map(ask, names))
    assert got == [(n, want["base" if n == base else n]) for n in names]
    stream = client.completions.create(model="l2", prompt=PROMPT, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert {c.model for c in chunks} == {"l2"} and "".join(c.choices[0].text for c in chunks) == want["l2"]
    after = metrics(server.url)
    for label, n in (("base", 3), ("l1", 3), ("l2", 4)):
        key = f'atb_llm_adapter_requests_total{{adapter="{label}"}}'
        assert after[key] - before.get(key, 0) == n
