"""Multiple-choice datasets as the harness scores them: prompt text per item, the option strings
whose next-token log-probabilities decide the answer, and the category each item counts in.

A loader is `load(shots, data_dir) -> Task`; `DATASETS` maps MindIE's test names to loaders.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import chain, zip_longest
from pathlib import Path


@dataclass(frozen=True)
class Item:
    id: str
    prompt: str
    answer: int  # index into Task.options
    subject: str = ""
    category: str = ""


@dataclass(frozen=True)
class Task:
    """name: "BoolQ"; options: continuation text per option, e.g. (" yes", " no"); labels: how the
    options are written in results ("yes", "no"); categories: the rows of the accuracy table in
    order, before "Avg acc" (empty: the average only)."""

    name: str
    options: tuple[str, ...]
    labels: tuple[str, ...]
    categories: tuple[str, ...]
    items: tuple[Item, ...]
    shots: int = 0

    def head(self, limit: int | None) -> Task:
        """The first `limit` items after interleaving subjects (item 0 of each subject, then item
        1, ...), subjects taken in turn from each category, so a short run spans subjects and
        categories instead of covering only the first subject."""
        if limit is None or limit >= len(self.items):
            return self
        by_subject: dict[str, list[Item]] = {}
        for item in self.items:
            by_subject.setdefault(item.subject, []).append(item)
        turn: Counter[str] = Counter()
        keyed = []
        for items in by_subject.values():
            category = items[0].category
            rank = self.categories.index(category) if category in self.categories else len(self.categories)
            keyed.append(((turn[category], rank), items))
            turn[category] += 1
        lists = [items for _, items in sorted(keyed, key=lambda k: k[0])]
        mixed = [i for i in chain.from_iterable(zip_longest(*lists)) if i is not None]
        return replace(self, items=tuple(mixed[:limit]))


@dataclass(frozen=True)
class DatasetSpec:
    load: Callable[[int, Path | None], Task]
    takes_shots: bool  # whether the command line gives a shot count before the batch size


def _boolq(shots: int, data_dir: Path | None) -> Task:
    from modeltest.datasets.boolq import load_boolq

    return load_boolq(data_dir)


def _mmlu(shots: int, data_dir: Path | None) -> Task:
    from modeltest.datasets.mmlu import load_mmlu

    return load_mmlu(shots, data_dir)


def _ceval(shots: int, data_dir: Path | None) -> Task:
    from modeltest.datasets.ceval import load_ceval

    return load_ceval(shots, data_dir)


DATASETS: dict[str, DatasetSpec] = {
    "full_BoolQ": DatasetSpec(_boolq, takes_shots=False),
    "full_MMLU": DatasetSpec(_mmlu, takes_shots=True),
    "full_CEval": DatasetSpec(_ceval, takes_shots=True),
}


def choice_block(question: str, choices: list[str], answer_prompt: str) -> str:
    """`question`, then "A. ..." per choice, then the answer prompt ("Answer:", "答案：")."""
    lines = [question] + [f"{'ABCD'[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines) + "\n" + answer_prompt


def take_shots(dev: list, shots: int, subject: str) -> list:
    if shots > len(dev):
        raise ValueError(f"shots={shots} but the dev split of {subject!r} has {len(dev)} items; use at most that")
    return dev[:shots]
