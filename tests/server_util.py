"""Servers for the server tests: started in this process on a free loopback port, always stopped."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from atb_llm.entrypoints.openai.serve import ServerThread, free_port
from atb_llm.runtime.engine import EngineConfig

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextmanager
def running_server(model_path: Path, **engine_kw) -> Iterator[ServerThread]:
    server = ServerThread.start(EngineConfig(str(model_path), progress=False, **engine_kw), free_port())
    try:
        yield server
    finally:
        server.stop()


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def metrics(url: str) -> dict[str, float]:
    """GET /metrics as {'name{labels}': value}."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r"([a-z_]+(?:\{[^}]*\})?) (\S+)", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def all_blocks_free(url: str) -> bool:
    m = metrics(url)
    used = [v for k, v in m.items() if k.startswith("atb_llm_cache_blocks_used")]
    return bool(used) and sum(used) == 0 and m["atb_llm_requests_running"] == 0
