"""The chat page in real headless Chromium (Debian's, driven by Playwright) against the default
model: ask, watch the answer stream in, see its stats; ask a follow-up (the history goes along),
stop it mid-answer (the server aborts it and frees its blocks); new chat. A screenshot is saved."""

import json
import re

import pytest
from server_util import CHROMIUM, CHROMIUM_ARGS, metrics, running_server, wait_until

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

sync_api = pytest.importorskip("playwright.sync_api")

ANSWER = ".msg.assistant .body"
STATS = re.compile(r"^\d+ tokens · [\d.]+ tokens/s · first token \d+ ms")


@pytest.fixture(scope="module")
def server(default_model):
    with running_server(default_model, max_batch_size=2, max_output_length=256) as s:
        yield s


@pytest.fixture()
def page():
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium; setup.sh does it)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1000, "height": 720})
        finally:
            browser.close()


def answer_length(page, i: int) -> int:
    return page.evaluate(f"document.querySelectorAll('{ANSWER}')[{i}]?.textContent.length ?? 0")


def test_chat_streams_stops_and_keeps_history(server, page, tmp_path):
    bodies = []
    page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and bodies.append(json.loads(r.post_data)))
    page.goto(server.url + "/")
    sync_api.expect(page.locator("#model")).to_have_text(server.model_name)
    page.click("#settings-toggle")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "16")

    page.fill("#input", "Write a Python function that adds two numbers.")
    page.keyboard.press("Enter")
    page.wait_for_function(  # part of the answer is on the page while it is still being generated
        "[...document.querySelectorAll('.msg.assistant[data-state=streaming] .body')].some(b => b.textContent)",
        timeout=120_000,
    )
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=120_000)
    first = page.locator(".msg.assistant").nth(0)
    assert first.locator(".body").inner_text().strip()
    assert STATS.match(first.locator(".stats").inner_text()), first.locator(".stats").inner_text()

    stopped_before = metrics(server.url)['atb_llm_requests_total{finish_reason="abort"}']
    page.fill("#max-tokens", "256")
    page.fill("#input", "Now explain in detail how it works, line by line.")
    page.click("#send")
    page.wait_for_function(f"document.querySelectorAll('{ANSWER}')[1]?.textContent.length > 0", timeout=120_000)
    shown = answer_length(page, 1)  # it grows while it streams; stop it a few words in
    page.wait_for_function(
        f"document.querySelectorAll('{ANSWER}')[1].textContent.length > {max(shown, 40)}", timeout=60_000
    )
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-state=stopped]", timeout=10_000)
    at_stop = answer_length(page, 1)
    page.wait_for_timeout(1500)
    assert answer_length(page, 1) == at_stop  # nothing arrives after stop
    assert page.locator(".msg.assistant").nth(1).locator(".stats").inner_text().endswith("stopped")
    assert page.is_visible("#send") and not page.is_visible("#stop")
    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot))
    print(f"\nscreenshot: {shot}")
    assert shot.stat().st_size > 10_000

    wait_until(
        lambda: metrics(server.url)['atb_llm_requests_total{finish_reason="abort"}'] == stopped_before + 1,
        10,
        "the server to abort the stopped answer",
    )
    wait_until(lambda: server.loop.stats.blocks_used == 0, 10, "all blocks to be free")

    assert [b["max_tokens"] for b in bodies] == [16, 256] and {b["temperature"] for b in bodies} == {0}
    assert all(b["stream"] and b["model"] == server.model_name for b in bodies)
    assert [m["role"] for m in bodies[1]["messages"]] == ["user", "assistant", "user"]
    shown_answer = first.locator(".body").inner_text()  # rendered: code fences became blocks
    assert bodies[1]["messages"][1]["content"].startswith(shown_answer.split("\n")[0])

    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.is_visible("#empty")
