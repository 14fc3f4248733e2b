"""Start the server: load the engine, warm it up, start its thread, serve HTTP with uvicorn.

python -m atb_llm.entrypoints.openai --model_path WEIGHT_DIR [--port 8000] [--host 127.0.0.1] [--max_batch_size 8]
    [--tensor_parallel_size N]

With --tensor_parallel_size N the command starts its own N ranks under torchrun: rank 0 serves HTTP
and drives the engine, the others replay its requests step by step (atb_llm/runtime/lockstep.py).
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from atb_llm.entrypoints.openai.app import create_app
from atb_llm.entrypoints.openai.engine_loop import EngineLoop
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.lockstep import Lockstep, follow
from atb_llm.utils.default_model import resolve_model_path
from atb_llm.utils.distributed import init_tensor_parallel, is_main_rank, launch_ranks, leave_tensor_parallel

log = logging.getLogger("atb_llm.server")
# max_output_length: the largest max_tokens a request may ask. Chunked prefill on, as vLLM's V1 and
# SGLang serve: a long prompt is prefilled 2048 tokens a step between decode steps, so it never
# stalls the streams in flight for its whole prefill (run_pa keeps MindIE's one-piece default)
SERVER_DEFAULTS = dict(max_output_length=512, chunked_prefill=True, max_prefill_tokens=2048)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m atb_llm.entrypoints.openai",
        description="OpenAI-compatible HTTP server and web chat page for atb_llm",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served_model_name", default=None, help="name in /v1/models (default: the folder's name)")
    p.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--api_key", "--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument(
        "--allowed_hosts",
        nargs="*",
        default=[],
        help="without --api_key: Host names served besides the loopback names and --host (DNS rebinding guard)",
    )
    p.add_argument(
        "--tensor_parallel_size",
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="shard the model over N ranks, started by the server itself under torchrun (one per device)",
    )
    EngineConfig.add_cli_args(p, **SERVER_DEFAULTS)
    args = p.parse_args(argv)
    if args.tensor_parallel_size < 1:
        p.error(f"--tensor_parallel_size {args.tensor_parallel_size}: give 1 or more ranks")
    if args.api_key is not None and not args.api_key.strip():
        p.error("--api_key is empty: give a key, or leave the flag out to serve loopback clients without one")
    return args


def engine_config(args: argparse.Namespace, progress: bool = True) -> EngineConfig:
    return EngineConfig.from_cli_args(args, model_path=str(resolve_model_path(args.model_path)), progress=progress)


def start_engine_loop(cfg: EngineConfig, engine: LLMEngine | Lockstep | None = None) -> EngineLoop:
    if engine is None:
        engine = LLMEngine(cfg)
        engine.warmup()
    loop = EngineLoop(engine)
    loop.start()
    return loop


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server(uvicorn.Server):
    """uvicorn's server, which on SIGTERM / Ctrl+C first ends every request in flight: streams get an
    error event and `[DONE]`, waiting non-streaming requests a 503, new requests a 503; then uvicorn
    closes the connections (they have finished by then) and stops."""

    def __init__(self, config: uvicorn.Config, loop: EngineLoop):
        super().__init__(config)
        self.engine_loop = loop

    def handle_exit(self, sig, frame) -> None:
        self.engine_loop.request_stop()
        super().handle_exit(sig, frame)


@dataclass
class ServerThread:
    """A server on a background thread (tests, benchmarks): `with ServerThread.start(cfg) as s: s.url`."""

    loop: EngineLoop
    server: Server
    thread: threading.Thread
    url: str
    model_name: str

    @classmethod
    def start(
        cls,
        cfg: EngineConfig,
        port: int,
        host: str = "127.0.0.1",
        name: str | None = None,
        api_key: str | None = None,
        allowed_hosts: tuple[str, ...] = (),
    ) -> ServerThread:
        loop = start_engine_loop(cfg)
        name = name or Path(cfg.model_path).name
        app = create_app(loop, name, api_key, {host, *allowed_hosts})
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
        server = Server(config, loop)
        thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                loop.stop()
                raise RuntimeError(f"the server did not start on {host}:{port} (port in use?)")
            time.sleep(0.02)
        return cls(loop, server, thread, f"http://{host}:{port}", name)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.loop.stop()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    launch_ranks(args.tensor_parallel_size, "atb_llm.entrypoints.openai", argv)  # N > 1: under torchrun
    args.device = init_tensor_parallel(args.device)  # this rank's device
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = engine_config(args, progress=is_main_rank())
    engine = LLMEngine(cfg)
    engine.warmup()  # every rank, in step
    if not is_main_rank():
        follow(engine)
        leave_tensor_parallel()
        return
    driver = Lockstep(engine) if args.tensor_parallel_size > 1 else engine
    loop = start_engine_loop(cfg, driver)
    name = args.served_model_name or Path(cfg.model_path).name
    app = create_app(loop, name, args.api_key, {args.host, *args.allowed_hosts})
    url = f"http://{args.host}:{args.port}"
    page = f"{url}/#key=API_KEY" if args.api_key else f"{url}/"
    print(f"[server] {name}: open {page} in a browser to chat; OpenAI API at {url}/v1", flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    try:
        Server(config, loop).run()
    finally:
        loop.stop()
        if isinstance(driver, Lockstep):
            driver.close()
            leave_tensor_parallel()
