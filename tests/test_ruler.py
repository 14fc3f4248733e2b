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
