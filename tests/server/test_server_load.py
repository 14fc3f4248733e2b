"""32 concurrent streaming clients share one engine loop (max_batch_size 8: the rest queue) and
get exactly the text each prompt gets alone; afterwards every cache block is free. A client
killed mid-stream, or one that gives up on a non-streaming answer, has its sequence aborted.
Tiny random model (fp32), greedy, with a sequential reference from a separate engine."""

import asyncio
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import openai
import pytest
from server_util import metrics, running_server, wait_until

from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams

pytestmark = pytest.mark.timeout(300)

WORDS = "hello world the quick brown fox jumps over the lazy dog def return if else".split()
PROMPTS = [" ".join(WORDS[i % 13 : i % 13 + 1 + i % 4]) + f" {i}" for i in range(32)]
MAX_TOKENS = 24
ENGINE = dict(block_size=16, max_batch_size=8, max_input_length=64, max_output_length=2048)


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models()


@pytest.fixture(scope="module")
def server(model):
    with running_server(model, **ENGINE) as s:
        yield s


@pytest.fixture(scope="module")
def reference(model):
    """Each prompt's greedy text, run alone."""
    engine = LLMEngine(EngineConfig(str(model), progress=False, **ENGINE))
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    return [engine.generate([p], params)[0].text for p in PROMPTS]


async def stream_one(client: openai.AsyncOpenAI, model: str, prompt: str) -> tuple[str, str, int]:
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    return "".join(text), finish, usage.completion_tokens


def test_32_concurrent_streams_get_their_own_text_and_free_every_block(server, reference):
    seen = {"running": 0, "waiting": 0}
    done = threading.Event()

    def watch():  # the engine loop's own snapshot, sampled while the clients run
        while not done.is_set():
            stats = server.loop.stats
            seen["running"] = max(seen["running"], stats.running)
            seen["waiting"] = max(seen["waiting"], stats.waiting)
            time.sleep(0.002)

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        async with client:
            return await asyncio.gather(*(stream_one(client, server.model_name, p) for p in PROMPTS))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = asyncio.run(main())
    finally:
        done.set()
        watcher.join()
    assert [r[0] for r in results] == reference
    assert {(r[1], r[2]) for r in results} == {("length", MAX_TOKENS)}
    assert seen["running"] == 8 and seen["waiting"] > 0  # batched, and the rest queued
    wait_until(lambda: server.loop.stats.blocks_used == 0, 10, "all blocks to be free")
    pools = server.loop.engine.cache_manager.block_manager.pools.values()
    assert all(p.num_free == p.num_blocks for p in pools)
    m = metrics(server.url)
    assert m['atb_llm_cache_blocks_used{pool="model",level="full"}'] == 0
    assert m['atb_llm_cache_bytes_used{pool="model"}'] == 0
    assert m['atb_llm_requests_total{finish_reason="length"}'] >= 32


CLIENT = textwrap.dedent(
    """
    import sys, httpx
    body = {"prompt": "hello world", "max_tokens": 2000, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", sys.argv[1] + "/v1/completions", json=body, timeout=60) as r:
        for i, line in enumerate(r.iter_lines()):
            if i == 6:
                print("streaming", flush=True)
    """
)


def test_killed_client_frees_its_blocks(server):
    before = metrics(server.url)
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, server.url], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "streaming"
        assert server.loop.stats.blocks_used > 0
        proc.kill()
    finally:
        proc.kill()
        proc.wait(10)
    wait_until(lambda: server.loop.stats.blocks_used == 0 and server.loop.stats.running == 0, 10, "the abort")
    after = metrics(server.url)
    key = 'atb_llm_requests_total{finish_reason="abort"}'
    assert after[key] == before[key] + 1
    generated = after["atb_llm_generation_tokens_total"] - before["atb_llm_generation_tokens_total"]
    assert 3 <= generated < 2000  # cut short, not run to max_tokens


def test_client_that_gives_up_on_a_non_streaming_answer_is_aborted(server):
    key = 'atb_llm_requests_total{finish_reason="abort"}'
    before = metrics(server.url)[key]
    body = {"prompt": "the lazy dog", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    wait_until(lambda: metrics(server.url)[key] == before + 1, 10, "the abort of the abandoned request")
    wait_until(lambda: server.loop.stats.blocks_used == 0, 10, "all blocks to be free")
