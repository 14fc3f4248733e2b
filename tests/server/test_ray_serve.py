"""Replicas on Ray Serve (a local Ray cluster on loopback, the tiny model): answers equal the
single engine's, both replicas serve, prompts sharing a prefix go to one replica, errors keep the
single server's bodies, streams stream, and a lost replica is replaced while the other serves."""

import json
import time
from types import SimpleNamespace

import httpx
import pytest
from server_util import wait_until

from atb_llm.entrypoints.openai.serve import free_port
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams

ray = pytest.importorskip("ray")  # the [ray] extra (setup.sh installs it)
from ray import serve  # noqa: E402

from atb_llm.entrypoints.openai import ray_serve  # noqa: E402

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]  # a Ray cluster: a minute to start
ENGINE = dict(block_size=16, max_input_length=96, max_output_length=16, dtype="fp32", max_batch_size=4)


@pytest.fixture(scope="module")
def cluster(tiny):
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = EngineConfig(str(tiny), progress=False, **ENGINE)
    serve.run(ray_serve.build(cfg, "tiny", replicas=2, replica_cpus=1), name="atb_llm", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _ok(url), 120, "the Ray Serve app")
    yield url
    serve.shutdown()
    ray.shutdown()


def _ok(url):
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def complete(url, prompt, **kw):
    body = dict(model="tiny", prompt=prompt, max_tokens=8, temperature=0) | kw
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    return r, r.headers.get("x-atb-replica")


def test_answers_equal_the_single_engine_and_both_replicas_serve(cluster, tiny):
    engine = LLMEngine(EngineConfig(str(tiny), progress=False, **ENGINE))
    prompts = [f"{w} the quick brown fox" for w in ("hello", "world", "dog", "lazy", "def", "return")]
    replicas = set()
    for p in prompts:
        want = engine.generate([engine.encode(p)], SamplingParams(max_tokens=8))[0].text
        r, replica = complete(cluster, p)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        replicas.add(replica)
    assert len(replicas) == 2  # unrelated prompts spread over both (the least loaded, or at random)
    models = httpx.get(cluster + "/v1/models", timeout=30).json()["data"]
    assert models[0]["id"] == "tiny"


def test_prompts_sharing_a_prefix_go_to_the_replica_that_has_it(cluster):
    shared = "hello world the quick brown fox jumps over the lazy dog " * 3
    served = {complete(cluster, shared + tail)[1] for tail in ("0123", "4567", "def", "return if", "else")}
    assert len(served) == 1


def test_errors_and_streams_are_the_single_servers(cluster):
    r, _ = complete(cluster, "hello", max_tokens=1000)
    assert r.status_code == 422 and r.json()["error"]["param"] == "max_tokens"
    r, _ = complete(cluster, "hello", model="other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    body = dict(model="tiny", prompt="hello world", max_tokens=6, temperature=0, stream=True)
    with httpx.stream("POST", cluster + "/v1/completions", json=body, timeout=60) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 3
    text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
    assert text == complete(cluster, "hello world", max_tokens=6)[0].json()["choices"][0]["text"]


def test_a_lost_replica_is_replaced_while_the_other_serves(cluster):
    _, victim = complete(cluster, "lazy dog 0123")
    actor = next(a for a in ray.util.list_named_actors(all_namespaces=True) if victim in a["name"])
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))
    start = time.monotonic()
    for i in range(6):  # served throughout, by the survivor while the victim is replaced
        r, _ = complete(cluster, f"quick {i} brown")
        assert r.status_code == 200
    wait_until(lambda: _two_running(), 120, "a replacement replica")
    assert time.monotonic() - start < 120


def _two_running():
    status = serve.status().applications["atb_llm"].deployments["Engine"]
    return status.replica_states.get("RUNNING", 0) == 2


def test_a_replica_whose_engine_stopped_fails_its_health_check():
    engine = ray_serve.Engine.__new__(ray_serve.Engine)
    engine.loop = SimpleNamespace(failure=None, alive=True)
    engine.check_health()
    engine.loop = SimpleNamespace(failure="RuntimeError: boom", alive=False)
    with pytest.raises(RuntimeError, match="the engine thread stopped: RuntimeError: boom"):
        engine.check_health()
