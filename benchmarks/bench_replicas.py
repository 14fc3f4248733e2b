"""Replicas on Ray Serve against the single server, and prefix-aware routing against routing by load.

    python -m benchmarks.bench_replicas [-m WEIGHT_DIR] [--clients 8] [--requests 32] [--systems 8]
        [--requests_shared 64] [--max_tokens 32]

throughput: `--requests` chat-free completions (distinct random prompts, `--max_tokens` each,
ignore_eos) from `--clients` concurrent clients against (a) the single server with torch on two
threads, (b) one Ray replica on one thread, (c) two replicas on one thread each. Reported: output
tokens/s, mean and p90 time to first token (streamed), per setup, measured in the same run.

routing: `--systems` system prompts shared by `--requests_shared` requests (each a system prompt
and its own question), sent by the clients to two replicas routed by prefix and by load; the share
of prompt tokens found in a replica's prefix cache (usage.prompt_tokens_details.cached_tokens).
Needs the [ray] extra. Results: results/replicas.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from atb_llm.entrypoints.openai.serve import ServerThread, free_port
from atb_llm.runtime.engine import EngineConfig
from benchmarks.common import cpu_name, engine_config, markdown_table

HERE = Path(__file__).parent


def stream_one(url: str, prompt: str, max_tokens: int) -> tuple[float, int, int, int]:
    """(time to first token, output tokens, prompt tokens, cached prompt tokens) of one streamed completion."""
    body = dict(prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, ignore_eos=True,
                stream_options={"include_usage": True})  # fmt: skip
    start, first, usage = time.perf_counter(), None, None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
            usage = chunk.get("usage") or usage
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    return first or 0.0, usage["completion_tokens"], usage["prompt_tokens"], cached


def run_load(url: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        got = list(pool.map(lambda p: stream_one(url, p, max_tokens), prompts))
    wall = time.perf_counter() - start
    ttft = sorted(g[0] for g in got)
    return {
        "tokens/s": sum(g[1] for g in got) / wall,
        "TTFT mean s": statistics.mean(ttft),
        "TTFT p90 s": ttft[int(0.9 * (len(ttft) - 1))],
        "cached share": sum(g[3] for g in got) / sum(g[2] for g in got),
    }


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]) + str(
        rng.randrange(100)) for _ in range(n))  # fmt: skip


def ray_app(cfg: EngineConfig, replicas: int, router: str, url: str) -> str:
    """Deploy the app on the running Serve instance (whose proxy listens at `url`, fixed at its
    start: Serve ignores a later port) and wait for it."""
    from ray import serve

    from atb_llm.entrypoints.openai import ray_serve

    serve.run(ray_serve.build(cfg, "m", replicas=replicas, replica_cpus=1, router=router), name="b", route_prefix="/")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("the Ray Serve app did not come up in 300 s")


def main(argv=None) -> str:
    import ray
    from ray import serve

    from atb_llm.entrypoints.openai import ray_serve

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--systems", type=int, default=8)
    ap.add_argument("--requests_shared", type=int, default=64)
    ap.add_argument("--max_tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    EngineConfig.add_cli_args(ap, block_size=16, max_batch_size=8, prefix_caching=True, chunked_prefill=True,
                              max_prefill_tokens=2048)  # fmt: skip
    args = ap.parse_args(argv)
    cfg = engine_config(args, max_input_length=512, max_output_length=args.max_tokens, progress=False)
    rng = random.Random(0)
    distinct = [words(rng, 40) for _ in range(args.requests)]
    systems = [words(rng, 120) for _ in range(args.systems)]
    shared = [f"{rng.choice(systems)}\nQuestion {i}: {words(rng, 8)}" for i in range(args.requests_shared)]
    rows = []
    torch.set_num_threads(2)
    single = ServerThread.start(cfg, free_port())
    try:
        stats = run_load(single.url, distinct, args.clients, args.max_tokens)
        rows.append({"setup": "single server, 2 threads"} | stats)
    finally:
        single.stop()
    ray_serve.start_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    proxy = f"http://127.0.0.1:{port}"
    try:
        for replicas in (1, 2):
            url = ray_app(cfg, replicas, "prefix", proxy)
            stats = run_load(url, distinct, args.clients, args.max_tokens)
            rows.append({"setup": f"Ray Serve, {replicas} replica(s) x 1 thread"} | stats)
            serve.delete("b")
        routing = []
        for router in ("prefix", "load"):
            url = ray_app(cfg, 2, router, proxy)
            routing.append({"router": router} | run_load(url, shared, args.clients, args.max_tokens))
            serve.delete("b")
    finally:
        serve.shutdown()
        ray.shutdown()
    fmt = lambda r: {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()}  # noqa: E731
    text = (
        f"Model {Path(cfg.model_path).name}, {cfg.dtype or 'checkpoint dtype'}, CPU: {cpu_name()}, "
        f"{args.clients} concurrent clients, {args.max_tokens} output tokens a request (ignore_eos)\n\n"
        f"## Throughput ({args.requests} distinct prompts)\n\n"
        + markdown_table([fmt(r) for r in rows], ["setup", "tokens/s", "TTFT mean s", "TTFT p90 s"])
        + f"\n\n## Routing ({args.systems} system prompts shared by {args.requests_shared} requests, 2 replicas)\n\n"
        + markdown_table([fmt(r) for r in routing], ["router", "cached share", "tokens/s", "TTFT mean s"])
        + "\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "replicas.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
