"""Replicas on Ray Serve (a local Ray cluster on loopback, the tiny model): answers equal the
single engine's, both replicas serve, prompts sharing a prefix go to one replica, errors keep the
single server's bodies, streams stream, and a lost replica is replaced while the other serves."""

import asyncio
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
ENGINE = dict(block_size=16, max_input_length=96, max_output_length=16, dtype="fp32", max_batch_size=4,
              prefix_caching=True)  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tiny):
    ray_serve.start_ray(num_cpus=3, include_dashboard=False, log_to_driver=False)
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
    """The second and later requests land where the first was served and find its blocks there."""
    shared = "hello world the quick brown fox jumps over the lazy dog " * 4
    answers = [complete(cluster, shared + tail) for tail in ("0123", "4567", "def", "return if", "else")]
    assert len({replica for _, replica in answers}) == 1
    cached = [r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] for r, _ in answers]
    assert cached[0] == 0 and all(c >= 32 for c in cached[1:])  # the shared whole blocks


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
    """Killed mid-stream: the stream ends with an error event and [DONE], never a hang; the other
    replica serves what comes next; Ray brings the count back to two."""
    prompt = "lazy dog 0123 " * 3
    _, victim = complete(cluster, prompt)  # the prefix router sends the stream below there too
    body = dict(model="tiny", prompt=prompt + "x", max_tokens=16, temperature=0, stream=True, ignore_eos=True)
    with httpx.stream("POST", cluster + "/v1/completions", json=body, timeout=60) as r:
        assert r.headers["x-atb-replica"] == victim
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))  # it has started
        actor = next(a for a in ray.util.list_named_actors(all_namespaces=True) if victim in a["name"])
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert any("replica_lost" in line for line in rest) or len(rest) >= 2  # an error event, or it had finished
    start = time.monotonic()
    for i in range(6):  # served throughout, by the survivor while the victim is replaced
        r, _ = complete(cluster, f"quick {i} brown")
        assert r.status_code == 200
    wait_until(lambda: _two_running(), 120, "a replacement replica")
    assert time.monotonic() - start < 120


def _two_running():
    status = serve.status().applications["atb_llm"].deployments["Engine"]
    return status.replica_states.get("RUNNING", 0) == 2


def test_autoscaling_adds_a_replica_under_load_and_removes_it_when_idle(tiny):
    """A second app on the same cluster, autoscaled 1..2 replicas on ongoing requests (target 1 a
    replica at max_batch_size 2); its Engine replicas are driven through their handle."""
    cfg = EngineConfig(str(tiny), progress=False, **(ENGINE | {"max_batch_size": 2}))
    app = ray_serve.build(cfg, "tiny", min_replicas=1, max_replicas=2, replica_cpus=0.5, downscale_delay_s=3)
    serve.run(app, name="scaled", route_prefix="/scaled")
    engines = serve.get_deployment_handle("Engine", app_name="scaled").options(stream=True)

    def running():
        return serve.status().applications["scaled"].deployments["Engine"].replica_states.get("RUNNING", 0)

    async def ask(i):
        body = json.dumps(dict(model="tiny", prompt=f"fox {i} " * 8, max_tokens=16, ignore_eos=True)).encode()
        gen = engines.handle.remote(ray_serve.Routed(prompt=f"{i}"), "POST", "/v1/completions", b"",
                                    [("content-type", "application/json"), ("host", "127.0.0.1")], body)  # fmt: skip
        status, _ = await gen.__anext__()
        return status, json.loads(b"".join([c async for c in gen]))

    async def load():
        answers = []
        while running() < 2:  # ongoing requests above the target until the second replica is up
            answers += await asyncio.gather(*(ask(i) for i in range(6)))
        return answers

    assert running() == 1
    answers = asyncio.run(asyncio.wait_for(load(), 180))
    assert answers and all(status == 200 and body["usage"]["completion_tokens"] == 16 for status, body in answers)
    wait_until(lambda: running() == 1, 120, "scaling back down when idle")
    serve.delete("scaled")


def test_a_replica_whose_engine_stopped_fails_its_health_check():
    engine = ray_serve.Engine.__new__(ray_serve.Engine)
    engine.loop = SimpleNamespace(failure=None, alive=True)
    engine.check_health()
    engine.loop = SimpleNamespace(failure="RuntimeError: boom", alive=False)
    with pytest.raises(RuntimeError, match="the engine thread stopped: RuntimeError: boom"):
        engine.check_health()
