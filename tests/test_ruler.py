"""The RULER-style tasks: every sample holds its answers, fits its length, and is the same for the
same seed; scoring counts the answers found."""

import random

import pytest
from transformers import AutoTokenizer

from benchmarks import ruler


class Encoder:
    """What `ruler.fit` uses of an engine: its tokenizer and chat encoding."""

    def __init__(self, path):
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))

    def encode(self, text, chat=False):
        msgs = [{"role": "user", "content": text}]
        return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)


@pytest.fixture(scope="module")
def encoder(default_model):
    return Encoder(default_model)


@pytest.mark.parametrize("task", ruler.TASKS)
@pytest.mark.parametrize("length", [1024, 4096])
def test_samples_hold_their_answers_and_fit(encoder, task, length):
    ids, answers = ruler.fit(encoder, task, length, random.Random(1))
    assert 0.8 * length <= len(ids) <= length
    text = encoder.tokenizer.decode(ids)
    assert all(a in text for a in answers) and len(set(answers)) == len(answers)
    assert ruler.score(" ".join(answers), answers) == 1.0 and ruler.score("", answers) == 0.0
    assert ruler.fit(encoder, task, length, random.Random(1)) == (ids, answers)
    if task == "cwe":  # the 10 answers are the most frequent words of the list
        words = next(line for line in text.split("\n") if line.startswith("1. ")).split()
        counts = {w: words.count(w) for w in set(words) if not w.endswith(".")}
        top = sorted(counts, key=counts.get, reverse=True)[:10]
        assert set(top) == set(answers)


def test_partial_answers_score_in_proportion():
    assert ruler.score("VAR ABC and DEF", ["ABC", "DEF", "GHI", "JKL"]) == 0.5


def test_full_groups_within_is_the_most_that_fit():
    for groups, full, window in [(48, 256, 9), (4, 32, 2), (112, 128, 9)]:
        for budget in [i / 100 for i in range(1, 101)]:
            r = ruler.full_groups_within(budget, groups, full, window)
            nbytes = lambda k, g=groups, f=full, w=window: k * f + (g - k) * w  # noqa: E731
            assert 0 <= r <= groups
            if nbytes(0) <= budget * groups * full:
                assert nbytes(r) <= budget * groups * full + 1e-9
            assert r == groups or nbytes(r + 1) > budget * groups * full


def test_intervals_and_paired_differences_by_hand():
    m, h = ruler.mean_ci([1.0, 0.0, 1.0, 1.0])
    assert m == 0.75 and h == pytest.approx(1.96 * (0.75 / 3 / 4) ** 0.5)  # sample variance 0.75 / 3, n = 4
    assert ruler.mean_ci([0.5] * 10) == (0.5, 0.0)
    args = type("A", (), dict(lengths=[2048], tasks=["vt", "cwe"], samples=3, seed=0, sink=16, recent=128,
                              block_size=16, dtype=None))()  # fmt: skip
    done = {ruler.key(c, t, 2048, args): s for c, t, s in [
        ("full", "vt", [1.0, 1.0, 0.0]), ("full", "cwe", [0.5, 0.5, 0.5]),
        ("x", "vt", [1.0, 0.0, 0.0]), ("x", "cwe", [0.5, 0.5, 0.5]),
    ]}  # fmt: skip
    full, x = ruler.summarize(done, ["full", "x"], args)
    assert full["vs full 2K"] == "+0.000 ± 0.000" and full["avg 2K"].startswith("0.583 ± ")
    assert x["avg 2K"].startswith("0.417 ± ") and x["vt 2K"].startswith("0.33 ± ")
    # paired: vt differs on one sample of three (-1/3 mean, its own interval), cwe not at all
    d = ruler.mean_ci([0.0, -1.0, 0.0])
    assert x["vs full 2K"] == f"{d[0] / 2:+.3f} ± {d[1] / 2:.3f}"


def test_caches_at_a_budget_hold_the_same_bytes(tiny_models, tmp_path):
    import argparse
    import json

    from atb_llm.runtime.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(str(tiny_models()), block_size=16, max_input_length=512, progress=False))
    (tmp_path / "razor_scores.json").write_text(json.dumps({"echo": [[0.1, 0.9], [0.2, 0.3]],
                                                            "induction": [[0.4, 0.1], [0.8, 0.0]]}))  # fmt: skip
    args = argparse.Namespace(model_path=str(tiny_models()), dtype=None, block_size=16, sink=4, recent=27,
                              budgets=[0.6, 0.3], plans=[], out=tmp_path)  # fmt: skip
    got = ruler.caches(engine, args, 512)
    shares = {name: share for name, (_, share) in got.items()}
    # bytes of a bf16 cache: an int8 block is 16 x 16 x 2 bytes + 16 x 2 fp32 scales, 640 of 1024
    assert shares["full"] == 1.0 and shares["full_int8"] == pytest.approx(640 / 1024)
    for b in args.budgets:
        same = {shares[f"razor {b}"]} | {shares[f"random {b} s{s}"] for s in range(3)}
        assert len(same) == 1 and shares[f"razor {b}"] <= b and shares[f"mlgc {b}"] <= b
        whole = lambda name: sum(lv.comp_slot is None for lv in got[name][0].levels)  # noqa: E731
        assert whole(f"mlgc {b}") >= whole(f"razor {b}")  # int8 buys more groups their whole history
    assert shares["razor 0.6"] == (2 * 32 + 2 * 2) / (4 * 32)  # two full groups and two windows of 2 blocks
    razor = got["razor 0.6"][0]
    assert [lv.name for lv in razor.levels] == ["window", "full", "full", "window"]  # top echo, then induction
