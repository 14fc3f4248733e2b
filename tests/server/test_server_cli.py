"""run_server.sh starts the server from the command line (tiny model), serves the page and the API,
and exits cleanly on SIGTERM, ending the requests in flight with an answer."""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from server_util import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]


def test_run_server_sh(tiny_models):
    port = free_port()
    cmd = ["bash", str(ROOT / "examples/server/run_server.sh"), "-m", str(tiny_models()), "--port", str(port)]
    cmd += ["--max_batch_size", "2", "--max_input_length", "64", "--max_output_length", "16", "--block_size", "16"]
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        assert proc.poll() is None, proc.stdout.read()
        try:
            return httpx.get(url + "/health").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(up, 120, "run_server.sh to serve /health")
        name = tiny_models().name
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == name
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "<title>atb_llm chat</title>" in page.text
        for asset in ("/static/chat.js", "/static/chat.css"):
            assert httpx.get(url + asset).status_code == 200
        assert "cdn" not in page.text.lower() and "http" not in httpx.get(url + "/static/chat.js").text
        body = {"prompt": "hello world", "max_tokens": 5, "ignore_eos": True}
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).json()["usage"]["completion_tokens"] == 5
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode in (0, -signal.SIGTERM), out  # uvicorn re-raises the signal after a clean stop
        assert "Finished server process" in out
        assert f"open {url}/ in a browser to chat" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_sigterm_ends_open_requests_cleanly(tiny_models):
    """SIGTERM while a stream is open and a non-streaming request waits: the stream gets an error
    event and [DONE], the waiting request a 503 JSON error, and the process exits."""
    port = free_port()
    cmd = [sys.executable, "-m", "atb_llm.entrypoints.openai", "-m", str(tiny_models()), "--port", str(port)]
    cmd += ["--max_batch_size", "2", "--max_input_length", "16", "--max_output_length", "4000", "--block_size", "16"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        assert proc.poll() is None, proc.stdout.read()
        try:
            return httpx.get(url + "/health").status_code == 200
        except httpx.TransportError:
            return False

    long = {"prompt": "hello", "max_tokens": 4000, "ignore_eos": True}
    waiting = {}

    def non_streaming():
        waiting["response"] = httpx.post(url + "/v1/completions", json=long, timeout=60)

    try:
        wait_until(up, 120, "the server to serve /health")
        t = threading.Thread(target=non_streaming)
        t.start()
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json={**long, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 3:  # mid-stream
                    proc.send_signal(signal.SIGTERM)
        t.join(60)
        out, _ = proc.communicate(timeout=60)
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert "shutting down" in json.loads(lines[-2].removeprefix("data: "))["error"]["message"]
        w = waiting["response"]
        assert w.status_code == 503 and "shutting down" in w.json()["error"]["message"], w.text
        assert proc.returncode in (0, -signal.SIGTERM), out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
