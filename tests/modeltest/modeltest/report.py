"""Where results go and how they are written: CSV files, Markdown tables, per-category accuracy.

Layout (MindIE's): RESULTS/<CPU|GPU|NPU>/<precision|performance>_test/<mode>/<dtype>/<model>/
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from benchmarks.common import markdown_table
from modeltest.args import RunArgs
from modeltest.datasets import Task

DEVICE_DIRS = {"cpu": "CPU", "cuda": "GPU", "npu": "NPU"}
AVG = "Avg acc"


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def results_dir(args: RunArgs, test_type: str, device: str) -> Path:
    folder = DEVICE_DIRS.get(device.split(":")[0], device.upper())
    path = Path(args.out) / folder / f"{test_type}_test" / args.mode / args.dtype / args.model_name
    path.mkdir(parents=True, exist_ok=True)
    return path


def mlgc_tag(mlgc: str) -> str:
    """off / auto / streaming / random, or a plan file's name without .json."""
    return Path(mlgc).stem if mlgc.endswith(".json") else mlgc


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def category_accuracy(task: Task, correct: list[bool]) -> list[dict]:
    """One row per category of the task (in its order) and a last "Avg acc" row over all items:
    {category, items, correct, accuracy}. Accuracy is over items (micro average)."""
    rows = []
    for category in task.categories:
        hits = [c for item, c in zip(task.items, correct) if item.category == category]
        rows.append(dict(category=category, items=len(hits), correct=sum(hits)))
    rows.append(dict(category=AVG, items=len(correct), correct=sum(correct)))
    for row in rows:
        row["accuracy"] = row["correct"] / row["items"] if row["items"] else float("nan")
    return rows


def merge_accuracy(ours: list[dict], theirs: list[dict] | None) -> list[dict]:
    """The per-category CSV rows; with a reference, its correct count and accuracy and the
    difference (ours - reference)."""
    if theirs is None:
        return ours
    return [
        dict(a, ref_correct=b["correct"], ref_accuracy=b["accuracy"], diff=a["accuracy"] - b["accuracy"])
        for a, b in zip(ours, theirs)
    ]


def _fmt(x: float, spec: str = ".4f") -> str:
    return "-" if math.isnan(x) else format(x, spec)  # nan: a category with no items


def accuracy_markdown(rows: list[dict], name: str = "atb_llm", reference: str = "transformers") -> str:
    """The seeds' table: a row per category and Avg acc; with the reference, its column and the diff."""
    compare = "ref_accuracy" in rows[0]
    table = []
    for r in rows:
        line = {"category": r["category"], "items": r["items"], name: _fmt(r["accuracy"])}
        if compare:
            line.update({reference: _fmt(r["ref_accuracy"]), "diff": _fmt(r["diff"], "+.4f")})
        table.append(line)
    columns = ["category", "items", name] + ([reference, "diff"] if compare else [])
    return markdown_table(table, columns)
