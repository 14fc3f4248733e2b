"""n > 1 samples of one prompt: the prompt is computed once (all but its last token), the siblings
start from copies of that cache (complete blocks of full-level groups shared), and each sample is
what the same request gives alone with its prompt split at the same place (window groups see the
last prompt token as a decode step)."""

import random

import pytest

from atb_llm.compression.layout import GroupLayout
from atb_llm.compression.levels import FullInt8, Level, Window, WindowInt8
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams

LAYOUTS = {
    "full": None,
    "mixed": GroupLayout(2, 2, (Level(), Window(sink=4, recent=12), WindowInt8(sink=4, recent=12), FullInt8())),
}


def engine(path, layout=None, **kw):
    cfg = EngineConfig(str(path), block_size=16, max_input_length=128, max_output_length=24, progress=False, **kw)
    return LLMEngine(cfg, layout=layout)


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=str)
@pytest.mark.parametrize("length", [1, 2, 16, 17, 70])
def test_each_sibling_samples_what_it_would_alone(tiny_models, layout, length):
    path = tiny_models()
    prompt = [random.Random(length).randrange(2, 320) for _ in range(length)]
    params = [SamplingParams(max_tokens=12, temperature=1.0, seed=s, ignore_eos=True) for s in range(4)]
    # alone, with the prompt split the same way: all but the last token, then the last as a decode step
    alone = engine(path, LAYOUTS[layout], chunked_prefill=True, max_prefill_tokens=max(1, length - 1))
    want = [alone.generate([prompt], p)[0].token_ids for p in params]
    eng = engine(path, LAYOUTS[layout])
    first = eng.add_request(prompt, params[0], "r0")
    rest = [eng.add_request(prompt, p, f"r{i}", sibling_of="r0") for i, p in enumerate(params[1:], 1)]
    seqs = [first, *rest]
    if length > 1:
        eng.step()  # the prompt but its last token, once
        assert first.num_computed_tokens == length - 1 and not first.output_token_ids
        assert all(s.num_computed_tokens == length - 1 for s in rest)
        assert eng.step() == seqs  # then one decode step gives each its first token
    while eng.has_unfinished():
        eng.step()
    assert [s.output_token_ids for s in seqs] == want
    assert len(set(map(tuple, want))) > 1  # the samples differ: each sibling has its own cache
    assert all(n == 0 for n in eng.cache_manager.block_manager.num_used().values())


def test_siblings_share_the_complete_blocks(tiny_models):
    eng = engine(tiny_models())
    prompt = list(range(2, 72))  # 70 tokens: 4 complete blocks of 16 and a partial one
    eng.add_request(prompt, SamplingParams(max_tokens=4), "a")
    eng.add_request(prompt, SamplingParams(max_tokens=4), "b", sibling_of="a")
    eng.step()
    # 4 groups: the parent's 5 blocks each, plus the sibling's copy of the partial block
    assert eng.cache_manager.block_manager.num_used() == {"model": 4 * 5 + 4}


def test_a_sibling_of_an_unknown_or_different_prompt_is_refused(tiny_models):
    eng = engine(tiny_models())
    eng.add_request([5, 6, 7], SamplingParams(max_tokens=2), "a")
    with pytest.raises(ValueError, match="sibling_of='b' names no unfinished request"):
        eng.add_request([5, 6, 7], SamplingParams(max_tokens=2), "c", sibling_of="b")
    with pytest.raises(ValueError, match="same prompt"):
        eng.add_request([5, 6], SamplingParams(max_tokens=2), "c", sibling_of="a")


def test_siblings_of_an_aborted_request_start_alone(tiny_models):
    path = tiny_models()
    prompt = list(range(2, 40))
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    want = engine(path).generate([prompt], params)[0].token_ids
    eng = engine(path)
    eng.add_request(prompt, params, "a")
    b = eng.add_request(prompt, params, "b", sibling_of="a")
    eng.abort("a")
    while eng.has_unfinished():
        eng.step()
    assert b.output_token_ids == want


# ---- the server: n and best_of ---------------------------------------------------------------------
def test_server_n_and_best_of(tiny_models, tmp_path):
    import json
    import shutil

    import httpx
    from server_util import running_server

    model = shutil.copytree(tiny_models(), tmp_path / "chat")
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    body = {"prompt": "the quick brown fox", "max_tokens": 6, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    with running_server(model, block_size=16) as server:

        def post(path, **kw):
            r = httpx.post(server.url + path, json={**body, **kw}, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()

        alone = [post("/v1/completions", seed=7 + j, logprobs=0) for j in range(3)]
        texts = [a["choices"][0]["text"] for a in alone]
        assert len(set(texts)) > 1
        got = post("/v1/completions", n=3)
        assert [c["index"] for c in got["choices"]] == [0, 1, 2]
        assert [c["text"] for c in got["choices"]] == texts  # sample j is seed 7 + j, as alone
        prompt_tokens = alone[0]["usage"]["prompt_tokens"]
        assert (got["usage"]["prompt_tokens"], got["usage"]["completion_tokens"]) == (prompt_tokens, 18)
        total = [sum(a["choices"][0]["logprobs"]["token_logprobs"]) for a in alone]
        (best,) = post("/v1/completions", n=1, best_of=3)["choices"]
        assert best["text"] == texts[total.index(max(total))] and best["logprobs"] is None
        two = post("/v1/completions", prompt=["hello world", "the lazy dog"], n=2)["choices"]
        assert [c["index"] for c in two] == [0, 1, 2, 3]
        chat = post("/v1/chat/completions", messages=[{"role": "user", "content": "hi"}], n=2, prompt=None)
        assert [c["index"] for c in chat["choices"]] == [0, 1] and chat["usage"]["completion_tokens"] == 12
        # streamed: the choices interleave, each chunk names its own; usage comes once, at the end
        parts, finished, usage = {0: "", 1: "", 2: ""}, [], None
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "n": 3, "stream": True}) as r:
            lines = [x for x in r.iter_lines() if x]
            for line in lines:
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                for c in chunk["choices"]:
                    parts[c["index"]] += c["text"]
                    if c["finish_reason"]:
                        finished.append(c["index"])
                usage = chunk.get("usage") or usage
            assert lines[-1] == "data: [DONE]"
        assert [parts[j] for j in range(3)] == texts and sorted(finished) == [0, 1, 2]
        assert usage["completion_tokens"] == 18


def test_siblings_fork_at_once_when_the_prefix_cache_holds_all_but_the_last_token(tiny_models):
    """33 tokens with blocks of 16: the cache holds the first 32, exactly what the siblings need."""
    path = tiny_models()
    prompt = list(range(2, 35))
    params = [SamplingParams(max_tokens=6, temperature=1.0, seed=s, ignore_eos=True) for s in range(3)]
    eng = engine(path, prefix_caching=True)
    eng.generate([prompt], SamplingParams(max_tokens=2))  # caches blocks 0-1
    seqs = [eng.add_request(prompt, params[0], "a")]
    seqs += [eng.add_request(prompt, p, f"s{i}", sibling_of="a") for i, p in enumerate(params[1:])]
    eng.step()
    assert all(s.num_computed_tokens >= 32 for s in seqs) and not eng.scheduler.siblings
    while eng.has_unfinished():
        eng.step()
    alone = engine(path, chunked_prefill=True, max_prefill_tokens=32)
    assert [s.output_token_ids for s in seqs] == [alone.generate([prompt], p)[0].token_ids for p in params]


def test_aborting_forked_siblings_before_the_next_step_corrupts_nothing(tiny_models):
    """The copies a fork makes are done within the step that forks: blocks the aborted siblings
    free go to the next request clean."""
    path = tiny_models()
    eng = engine(path, LAYOUTS["mixed"], num_blocks=24)
    prompt, other = list(range(2, 72)), list(range(100, 150))
    want = engine(path, LAYOUTS["mixed"]).generate([other], SamplingParams(max_tokens=8))[0].token_ids
    eng.add_request(prompt, SamplingParams(max_tokens=4), "a")
    for i in range(2):
        eng.add_request(prompt, SamplingParams(max_tokens=4), f"s{i}", sibling_of="a")
    eng.step()  # the prompt but its last token, and the fork
    assert not eng.cache_manager.block_manager.copies  # made in that step, not left for the next one
    for rid in ("a", "s0", "s1"):
        eng.abort(rid)
    assert eng.generate([other], SamplingParams(max_tokens=8))[0].token_ids == want
    assert all(n == 0 for n in eng.cache_manager.block_manager.num_used().values())
