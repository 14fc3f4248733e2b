"""RULER-style synthetic tasks (after RULER, Hsieh et al. 2024), generated from a seed, and their
scoring: the samples of `benchmarks.ruler`.

- niah_single: one needle "The special magic number for KEY is: N." at a random depth; answer N.
- niah_multikey: four needles with different keys; answer the number of one of them.
- niah_multivalue: four numbers for the same key; answer all four (score: the share found).
- vt (variable tracking): VAR A = N, then VAR B = VAR A, ... five links spread over the text; name
  every variable holding N (score: the share named).
- cwe (common word extraction): a numbered word list where 10 words come 30 times (fewer below 3K
  tokens) and the others 3 times; name the 10 most common (score: the share named).
"""

from __future__ import annotations

import random

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe")
MAX_NEW = {"niah_single": 24, "niah_multikey": 24, "niah_multivalue": 64, "vt": 48, "cwe": 96}
INTRO = "Some special magic numbers are hidden inside the following text. Memorize them.\n"


def word(rng: random.Random) -> str:
    """A pronounceable made-up word: no overlap with anything the model knows."""
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4)))


def number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


class Haystack:
    """Filler text of a token budget, with sentences placed at depths in [0, 1]."""

    def __init__(self, tokenizer, length: int):
        self.per_filler = len(tokenizer.encode(FILLER))
        self.length = length

    def build(self, inserts: list[tuple[float, str]], reserve: int) -> str:
        n = max(1, (self.length - reserve) // self.per_filler)
        at = sorted((int(n * d), s) for d, s in inserts)
        parts, last = [], 0
        for pos, sentence in at:
            parts.append(FILLER * (pos - last) + sentence + " ")
            last = pos
        parts.append(FILLER * (n - last))
        return "".join(parts)


def make_sample(task: str, hay: Haystack, rng: random.Random) -> tuple[str, list[str]]:
    """(prompt text, the strings a right answer contains)."""
    if task == "niah_single":
        key, value = word(rng), number(rng)
        text = hay.build([(rng.random(), f"The special magic number for {key} is: {value}.")], 120)
        return INTRO + text + f"\nWhat is the special magic number for {key} mentioned in the text?", [value]
    if task == "niah_multikey":
        keys = [word(rng) for _ in range(4)]
        values = [number(rng) for _ in keys]
        needles = [(rng.random(), f"The special magic number for {k} is: {v}.") for k, v in zip(keys, values)]
        i = rng.randrange(4)
        return INTRO + hay.build(needles, 180) + f"\nWhat is the special magic number for {keys[i]}?", [values[i]]
    if task == "niah_multivalue":
        key, values = word(rng), [number(rng) for _ in range(4)]
        needles = [(rng.random(), f"One of the special magic numbers for {key} is: {v}.") for v in values]
        question = f"\nWhat are all the special magic numbers for {key} mentioned in the text? List all four."
        return INTRO + hay.build(needles, 200) + question, values
    if task == "vt":
        value, names = str(rng.randrange(10000, 100000)), [word(rng).upper() for _ in range(5)]
        links = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        inserts = [(i / 5 + rng.random() / 5, s) for i, s in enumerate(links)]
        intro = "Memorize and track the chains of variable assignments hidden in the following text.\n"
        question = f"\nFind all variables that are assigned the value {value} in the text above, directly or not."
        return intro + hay.build(inserts, 200) + question, names
    if task == "cwe":
        entries = hay.length // 5  # about 5 tokens an entry ("123. word "); `fit` trims what is over
        freq = max(5, min(30, entries // 20))  # RULER: 30 for each common word, 3 for the others
        common = [word(rng) for _ in range(10)]
        rare = [word(rng) for _ in range(max(10, (entries - 10 * freq) // 3))]
        words = [w for w in common for _ in range(freq)] + [w for w in rare for _ in range(3)]
        rng.shuffle(words)
        listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        question = "\nWhat are the 10 most common words in the above list? Answer with the 10 words."
        return "Below is a numbered list of words.\n" + listing + question, common
    raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")


def fit(engine, task: str, length: int, rng: random.Random) -> tuple[list[int], list[str]]:
    """A sample whose chat prompt has at most `length` tokens (cwe's list is cut to fit)."""
    hay = Haystack(engine.tokenizer, length)
    text, answers = make_sample(task, hay, rng)
    ids = engine.encode(text, chat=True)
    while task == "cwe" and len(ids) > length:  # drop rare words from the end of the list
        head, _, question = text.rpartition("\n")
        text = head[: int(len(head) * length / len(ids) * 0.98)].rsplit(" ", 2)[0] + "\n" + question
        ids = engine.encode(text, chat=True)
    return ids, answers


def score(text: str, answers: list[str]) -> float:
    return sum(a.lower() in text.lower() for a in answers) / len(answers)
