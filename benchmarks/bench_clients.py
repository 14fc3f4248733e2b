"""Time to first token and tokens/s per client at N concurrent streaming clients, over loopback.

    python -m benchmarks.bench_clients                      # starts a server (default model), 1 / 8 / 32 clients
    python -m benchmarks.bench_clients --url http://127.0.0.1:8000 --clients 1 4

Every client streams one chat answer of exactly --max_tokens tokens (ignore_eos), all started at
once. Seen from the client: first token = request sent -> first content chunk; decode tokens/s =
(tokens - 1) / (last chunk - first chunk); end-to-end tokens/s = tokens / (last chunk - request sent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

QUESTIONS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain what a KV cache is in LLM inference.",
    "Write a SQL query that returns the ten largest orders.",
    "What is the difference between a list and a tuple in Python?",
    "Write a C function that reverses a string in place.",
    "Explain continuous batching in two paragraphs.",
    "Write a bash one-liner that counts lines in all .py files.",
    "What does the Python GIL do?",
]


@dataclass
class ClientResult:
    question: str
    text: str
    ttft_s: float
    tokens: int
    decode_s: float  # first chunk -> last chunk
    total_s: float  # request sent -> last chunk


async def one_client(http: httpx.AsyncClient, url: str, question: str, max_tokens: int) -> ClientResult:
    body = {
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = None
    tokens, text = 0, []
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                text.append(chunk["choices"][0]["delta"]["content"])
                last = time.perf_counter()
                first = first or last
    if first is None:
        raise RuntimeError(f"no content streamed for {question!r}")
    return ClientResult(question, "".join(text), first - start, tokens, last - first, last - start)


async def run_level(url: str, clients: int, max_tokens: int) -> tuple[list[ClientResult], float]:
    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        start = time.perf_counter()
        jobs = [one_client(http, url, QUESTIONS[i % len(QUESTIONS)], max_tokens) for i in range(clients)]
        results = await asyncio.gather(*jobs)
        return results, time.perf_counter() - start


def summarize(clients: int, results: list[ClientResult], wall_s: float) -> dict:
    ttft = [r.ttft_s * 1000 for r in results]
    decode = [(r.tokens - 1) / r.decode_s for r in results if r.decode_s > 0]
    e2e = [r.tokens / r.total_s for r in results]
    return {
        "clients": clients,
        "TTFT mean ms": statistics.mean(ttft),
        "TTFT p50 ms": statistics.median(ttft),
        "TTFT max ms": max(ttft),
        "decode tokens/s per client": statistics.mean(decode),
        "e2e tokens/s per client": statistics.mean(e2e),
        "total tokens/s": sum(r.tokens for r in results) / wall_s,
        "wall s": wall_s,
    }


def consistency(results: list[ClientResult]) -> str:
    """Greedy: a question's answer must not depend on what it was batched with."""
    answers: dict[str, set[str]] = {}
    for r in results:
        answers.setdefault(r.question, set()).add(r.text)
    same = sum(len(texts) == 1 for texts in answers.values())
    return f"{same} of {len(answers)} questions got the same greedy text in every run and batch"


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return "\n".join(lines)


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """A server subprocess on args.port (so the clients do not share its interpreter)."""
    cmd = [sys.executable, "-m", "atb_llm.entrypoints.openai", "--port", str(args.port), "--log_level", "warning"]
    cmd += ["--max_batch_size", str(args.max_batch_size)]
    if args.model_path:
        cmd += ["--model_path", args.model_path]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(cmd, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server did not come up on {url} within 300 s")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server (default: start one)")
    p.add_argument("--model_path", "-m", default=None, help="for the started server (default: the default model)")
    p.add_argument("--port", type=int, default=8011, help="for the started server")
    p.add_argument("--max_batch_size", type=int, default=8, help="for the started server")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max_tokens", type=int, default=64)
    args = p.parse_args(argv)
    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        asyncio.run(run_level(url, 1, 4))  # warm-up
        rows, results = [], []
        for n in args.clients:
            level, wall_s = asyncio.run(run_level(url, n, args.max_tokens))
            rows.append(summarize(n, level, wall_s))
            results += level
            print(f"{n} client(s) done in {wall_s:.1f} s", file=sys.stderr, flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    started = f" (started here, max_batch_size {args.max_batch_size})" if proc else ""
    print(f"\n{args.max_tokens} output tokens per client, server {url}{started}")
    print(markdown(rows))
    print(consistency(results))
    return rows


if __name__ == "__main__":
    main()
