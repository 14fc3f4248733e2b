"""BoolQ dev (3270 items), 0-shot: passage, question, "Answer:"; scored on " yes" against " no"."""

from __future__ import annotations

from pathlib import Path

from modeltest.datasets import Item, Task
from modeltest.datasets.olmo import olmo_datasets_dir, read_split

SPLIT = Path("boolq/none/validation")


def boolq_prompt(passage: str, question: str) -> str:
    question = question.strip()
    if not question.endswith("?"):
        question += "?"
    return f"{passage.strip()}\nQuestion: {question}\nAnswer:"


def load_boolq(data_dir: Path | None = None) -> Task:
    rows = read_split(olmo_datasets_dir(data_dir) / SPLIT)
    items = tuple(
        Item(f"boolq-{i}", boolq_prompt(r["passage"], r["question"]), 0 if r["answer"] else 1)
        for i, r in enumerate(rows)
    )
    return Task("BoolQ", (" yes", " no"), ("yes", "no"), (), items)
