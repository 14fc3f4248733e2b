"""Several weight/cache variants of one model in one run, side by side.

The positional WEIGHT_DIR with --mlgc is the first variant; each `--variant WEIGHT_DIR[@MLGC]`
adds one (e.g. `--variant /data/w8a16 --variant default@plan.json`). Every variant runs the same
items and writes its usual files under <MODEL>/<variant name>/; then one table compares them:
accuracy, the difference to the first variant in points, and the share of items on which the
variant gives the first one's answer (the same option, or for code the same pass/fail).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.common import markdown_table
from modeltest.args import RunArgs, parse_variant


@dataclass(frozen=True)
class Variant:
    name: str
    weight_dir: str | None  # None: the default model
    mlgc: str


def _name(weight_dir: str | None, mlgc: str) -> str:
    name = Path(weight_dir).resolve().name if weight_dir else "default"
    if mlgc != "off":
        name += "+mlgc-" + (Path(mlgc).stem if mlgc.endswith(".json") else mlgc)
    return re.sub(r"[^\w.+-]", "_", name)


def variants(args: RunArgs) -> list[Variant]:
    """The first variant (positional weights, --mlgc) and one per --variant, named uniquely."""
    specs = [(args.weight_dir, args.mlgc)] + [parse_variant(s) for s in args.variants]
    out, seen = [], {}
    for weight, mlgc in specs:
        name = _name(weight, mlgc)
        seen[name] = seen.get(name, 0) + 1
        out.append(Variant(name if seen[name] == 1 else f"{name}-{seen[name]}", weight, mlgc))
    return out


def args_for(args: RunArgs, v: Variant) -> RunArgs:
    """The run's arguments for one variant; its files go to <MODEL>/<variant name>/."""
    return replace(args, weight_dir=v.weight_dir, mlgc=v.mlgc, model_name=f"{args.model_name}/{v.name}", variants=())


def side_by_side(runs: list[tuple[Variant, dict, list]], metric: str, answer: str) -> list[dict]:
    """runs: (variant, summary, per-item rows) with the first variant first; `metric` names the
    summary's score, `answer` the item field compared for agreement. One row per variant."""
    _, first_summary, first_items = runs[0]
    table = []
    for v, summary, items in runs:
        if [r.get("id", r.get("task_id")) for r in items] != [r.get("id", r.get("task_id")) for r in first_items]:
            raise ValueError(f"variant {v.name} ran other items than {runs[0][0].name}")
        same = sum(a[answer] == b[answer] for a, b in zip(items, first_items))
        table.append(
            dict(
                variant=v.name,
                weights=v.weight_dir or "default",
                mlgc=v.mlgc,
                items=len(items),
                **{metric: f"{summary[metric]:.4f}"},
                diff_points=f"{100 * (summary[metric] - first_summary[metric]):+.2f}",
                agreement=f"{same / len(items):.4f}",
            )
        )
    return table


def write(folder: Path, stem: str, title: str, table: list[dict]) -> str:
    """<folder>/<stem>.md and .json; returns the Markdown printed."""
    columns = list(table[0])
    text = f"{title}\n\n{markdown_table(table, columns)}\n"
    first = table[0]["variant"]
    text += f"\ndiff_points and agreement are against {first} (agreement: share of items with its answer)\n"
    (folder / f"{stem}.md").write_text(text, encoding="utf-8")
    (folder / f"{stem}.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    print(f"\n{text}results: {folder}/{stem}.md")
    return text
