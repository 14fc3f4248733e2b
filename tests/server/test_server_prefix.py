"""The prefix cache through the server (tiny model): usage reports the prompt tokens it found."""

import json

import httpx
from server_util import running_server

ENGINE = dict(block_size=16, max_input_length=64, max_output_length=16, dtype="fp32")


def test_usage_counts_the_prompt_tokens_found_in_the_prefix_cache(tiny):
    """usage.prompt_tokens_details.cached_tokens (OpenAI's field): 0 the first time, then the
    whole blocks found (the last prompt token is always computed), streamed or not."""
    prompt = list(range(3, 43))  # 40 tokens: two whole blocks of 16 can be found again
    with running_server(tiny, prefix_caching=True, **ENGINE) as s:
        usages = []
        for stream in (False, False, True):
            body = dict(prompt=prompt, max_tokens=3, temperature=0, stream=stream)
            if stream:
                body["stream_options"] = {"include_usage": True}
                with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
                    lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: {")]
                usages.append(json.loads(lines[-1])["usage"])
            else:
                usages.append(httpx.post(s.url + "/v1/completions", json=body, timeout=60).json()["usage"])
    assert [u["prompt_tokens_details"]["cached_tokens"] for u in usages] == [0, 32, 32]
    assert all(u["prompt_tokens"] == 40 for u in usages)
