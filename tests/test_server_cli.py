"""run_server.sh starts the server from the command line (tiny model), serves the page and the API,
and exits cleanly on SIGTERM."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from server_util import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]


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
