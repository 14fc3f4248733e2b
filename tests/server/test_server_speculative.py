"""Speculative decoding through the server (tiny model): concurrent streams answer as without it,
and /metrics shows how much of what was proposed was accepted."""

from concurrent.futures import ThreadPoolExecutor

import httpx
from server_util import all_blocks_free, metrics, running_server

ENGINE = dict(block_size=16, max_input_length=64, max_output_length=40, dtype="fp32", max_batch_size=4)
PROMPTS = [[5, 9, 33, 2, 71, 18, 4, 60, 7] * 3, [200, 3, 3, 150, 90] * 8, list(range(40, 75))]


def answers(url: str) -> list[str]:
    def ask(prompt):
        body = dict(prompt=prompt, max_tokens=40, temperature=0, ignore_eos=True)
        return httpx.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(ask, PROMPTS))


def test_the_server_with_prompt_lookup_answers_as_without(tiny):
    with running_server(tiny, **ENGINE) as s:
        want = answers(s.url)
    with running_server(tiny, speculative="ngram", num_speculative_tokens=3, **ENGINE) as s:
        assert answers(s.url) == want
        m = metrics(s.url)
        assert all_blocks_free(s.url)
    proposed, accepted = m["atb_llm_spec_proposed_tokens_total"], m["atb_llm_spec_accepted_tokens_total"]
    assert proposed > 0 and 0 < accepted <= proposed
    assert m["atb_llm_spec_acceptance_rate"] == round(accepted / proposed, 6)
    assert m["atb_llm_spec_mean_accepted_length"] > 1
