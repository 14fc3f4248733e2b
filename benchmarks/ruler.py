"""RULER-style long-context accuracy of KV caches at equal KV budgets, with intervals.

    python -m benchmarks.ruler [-m WEIGHT_DIR] [--lengths 2048 4096] [--samples 50] [--budgets 0.5 0.25 0.1]
        [--sink 16 --recent 128 --block_size 16] [--plans NAME=PLAN.json ...] [--caches NAME ...] [--dtype fp32]

Tasks: benchmarks/ruler_tasks.py (niah single / multikey / multivalue, variable tracking, common
words), `--samples` per task and length, seeded: every cache answers the same samples. Each
prompt is prefilled once and its stored K/V written again under every cache
(atb_llm.runtime.shared_prefill: exact, since prefill attends over the whole prompt whatever the
layout); greedy decode through each cache gives its answers.

Caches, at equal KV budgets counted from the level registry (bytes of whole blocks at the longest
length of the grid, as a share of a full bf16 cache's: what a deployment holds, whatever dtype
computes here): full, full_int8, streaming (every group a
window), and at each budget: razor (the groups of highest retrieval-head scores full, as many as
the budget holds, the others windows), mlgc (the same scores spent over full, full_int8, window
and window_int8 by the knapsack: `calibrate.sh --kv_budget B --int8`), random (as many full
groups as razor, on random groups, 3 seeds), and any `--plans` given (e.g. loss-calibrated plans,
named with their budget). Reported per cache: the mean score and its 95% interval per task and length, the
five-task average, and the paired difference to the full cache on the same samples with its 95%
interval. Rows are kept per sample in results/ruler_rows.json, so a stopped run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch
from tqdm import tqdm

from atb_llm.compression.layout import GroupLayout
from atb_llm.compression.levels import Level, Window
from atb_llm.compression.memory import level_bytes
from atb_llm.compression.plan import MlgcPlan, aligned_recent, baseline_plan, plan_from_selection
from atb_llm.runtime.calibration import CalibrationConfig, budget_levels, calibrate, choose_full
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams
from atb_llm.runtime.shared_prefill import capture_prefills
from benchmarks.common import engine_config, markdown_table
from benchmarks.ruler_tasks import MAX_NEW, TASKS, fit, score

HERE = Path(__file__).parent
BYTES_DTYPE = torch.bfloat16  # budgets count a 16-bit cache's bytes, as deployed, whatever dtype computes here
Z95 = 1.96


def full_groups_within(budget: float, groups: int, full: int, window: int) -> int:
    """The most full groups (the rest windows) whose bytes stay within `budget` of the full cache's."""
    return max(0, min(groups, math.floor((budget * groups * full - groups * window) / (full - window))))


def caches(engine: LLMEngine, args: argparse.Namespace, reference: int) -> dict[str, tuple[GroupLayout, float]]:
    """name -> (layout, share of the full cache's KV bytes at `reference` tokens)."""
    c, bs, dt = engine.model_config, args.block_size, BYTES_DTYPE
    recent = aligned_recent(args.sink, args.recent, bs)
    sizes = {lv: level_bytes(lv, reference, c.head_dim, dt, bs) for lv in (Level(), Window(args.sink, recent))}
    full_b, win_b = sizes.values()
    share = lambda lay: sum(level_bytes(lv, reference, c.head_dim, dt, bs) for lv in lay.levels) / (
        c.num_groups * full_b
    )  # fmt: skip
    scores_path = args.out / "razor_scores.json"  # retrieval-head scores do not depend on the geometry
    if not scores_path.is_file():
        plan = calibrate(str(args.model_path), CalibrationConfig(block_size=bs), args.dtype, progress=False)
        scores_path.write_text(json.dumps(plan.scores))
    scores = json.loads(scores_path.read_text())
    echo, induction = (sum(scores[k], []) for k in ("echo", "induction"))
    uniform = GroupLayout.uniform(c.num_hidden_layers, c.num_key_value_heads)
    out = {"full": uniform, "full_int8": uniform.as_int8()}
    out["streaming"] = baseline_plan("streaming", c, bs, args.sink, args.recent).to_layout()
    for b in args.budgets:
        r = full_groups_within(b, c.num_groups, full_b, win_b)
        razor = plan_from_selection(
            c, choose_full(echo, induction, r), bs, args.sink, args.recent, False, "razor", None
        )
        out[f"razor {b}"] = razor.to_layout()
        cal = CalibrationConfig(kv_budget=b, reference_tokens=reference, sink=args.sink, recent=args.recent,
                                int8=True, block_size=bs)  # fmt: skip
        chosen, _ = budget_levels(echo, induction, cal, c.head_dim, dt)
        out[f"mlgc {b}"] = GroupLayout(c.num_hidden_layers, c.num_key_value_heads, tuple(chosen))
        for seed in range(3):
            chosen = set(random.Random(seed).sample(range(c.num_groups), r))
            rnd = plan_from_selection(c, chosen, bs, args.sink, args.recent, False, "random", None)
            out[f"random {b} s{seed}"] = rnd.to_layout()
    for spec in args.plans:
        name, _, path = spec.partition("=")
        plan = MlgcPlan.load(path)
        plan.check(c, bs, where=path)
        out[name] = plan.to_layout()
    return {name: (lay, share(lay)) for name, lay in out.items()}


def answers(engine: LLMEngine, prefilled: list, params: SamplingParams) -> list[str]:
    """Greedy answers of prefilled prompts through the engine's current layout, as many at once as fit."""
    pending, seqs = list(prefilled), []
    while pending or engine.has_unfinished():
        while pending:
            try:
                seqs.append(engine.add_prefilled(pending[0], params))
            except RuntimeError:  # the batch or the pools are full: decode first
                break
            pending.pop(0)
        if engine.has_unfinished():
            engine.step()
    return [engine.text_of(s) for s in seqs]


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval (normal approximation)."""
    m = sum(xs) / len(xs)
    var = sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1)
    return m, Z95 * math.sqrt(var / len(xs))


def summarize(done: dict, names: list[str], args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in names:
        row = {"cache": name}
        for n in args.lengths:
            k = label(n)
            per_task, diffs = [], []
            for task in args.tasks:
                s, f = done[key(name, task, n, args)], done[key("full", task, n, args)]
                m, h = mean_ci(s)
                row[f"{task} {k}"] = f"{m:.2f} ± {h:.2f}"
                per_task.append((m, h))
                diffs.append(mean_ci([a - b for a, b in zip(s, f)]))
            avg = sum(m for m, _ in per_task) / len(per_task)  # tasks independent: half-widths add in quadrature
            row[f"avg {k}"] = f"{avg:.3f} ± {math.sqrt(sum(h * h for _, h in per_task)) / len(per_task):.3f}"
            d = sum(m for m, _ in diffs) / len(diffs)
            row[f"vs full {k}"] = f"{d:+.3f} ± {math.sqrt(sum(h * h for _, h in diffs)) / len(diffs):.3f}"
            row[f"_avg {k}"] = avg
        rows.append(row)
    return rows


def label(n: int) -> str:
    return f"{n / 1024:g}K"


def key(name: str, task: str, n: int, args: argparse.Namespace) -> str:
    return f"{name}|{task}|{n}|{args.samples}|{args.seed}|{args.sink}/{args.recent}/{args.block_size}|{args.dtype}"


def plot(rows: list[dict], shares: dict[str, float], n: int, path: Path) -> None:
    """Five-task average against KV bytes (% of full), one line per kind of cache."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    by_kind: dict[str, list[tuple[float, float, float]]] = {}
    for row in rows:
        kind = row["cache"].split(" ")[0]
        m, h = (float(x) for x in row[f"avg {label(n)}"].split(" ± "))
        by_kind.setdefault(kind, []).append((100 * shares[row["cache"]], m, h))
    for kind, pts in sorted(by_kind.items()):
        xs, ys, hs = zip(*sorted(pts))
        ax.errorbar(xs, ys, yerr=hs, marker="o", capsize=3, label=kind)
    ax.set_xlabel(f"KV bytes at {label(n)} tokens (% of the full cache)")
    ax.set_ylabel("RULER-style score, mean of tasks")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096])
    ap.add_argument("--samples", type=int, default=50, help="per task and length")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.25, 0.1], help="KV shares of the full cache")
    ap.add_argument("--plans", nargs="*", default=[], help="NAME=PLAN.json: more caches (e.g. loss-calibrated)")
    ap.add_argument("--caches", nargs="*", default=None, help="only these caches, by name (default: all)")
    ap.add_argument("--sink", type=int, default=16)
    ap.add_argument("--recent", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    EngineConfig.add_cli_args(ap, block_size=16, max_batch_size=8)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = engine_config(args, max_input_length=max(args.lengths) + 256, max_output_length=max(MAX_NEW.values()),
                        chunked_prefill=False, prefix_caching=False, mlgc="off", progress=False)  # fmt: skip
    args.model_path = cfg.model_path
    engine = LLMEngine(cfg)
    layouts = caches(engine, args, max(args.lengths))
    if args.caches:
        layouts = {n: v for n, v in layouts.items() if n in args.caches or n == "full"}
    done_path = args.out / "ruler_rows.json"  # per-sample scores so far: a stopped run resumes
    done = json.loads(done_path.read_text()) if done_path.is_file() else {}
    for n in args.lengths:
        for task in args.tasks:
            todo = [name for name in layouts if key(name, task, n, args) not in done]
            if not todo:
                continue
            rng = random.Random(f"{task}/{n}/{args.seed}")
            items = [fit(engine, task, n, rng) for _ in range(args.samples)]  # the same samples for every cache
            engine.set_layout(layouts["full"][0])
            prefilled = capture_prefills(engine, [ids for ids, _ in items])
            for name in tqdm(todo, desc=f"{task} {label(n)}"):
                engine.set_layout(layouts[name][0])
                texts = answers(engine, prefilled, SamplingParams(max_tokens=MAX_NEW[task]))
                done[key(name, task, n, args)] = [score(t, a) for t, (_, a) in zip(texts, items)]
                done_path.write_text(json.dumps(done))
    names = list(layouts)
    rows = summarize(done, names, args)
    shares = {name: share for name, (_, share) in layouts.items()}
    for row in rows:
        row["KV %"] = f"{100 * shares[row['cache']]:.1f}"
    ks = [label(n) for n in args.lengths]
    columns = ["cache", "KV %"] + [f"{p} {k}" for k in ks for p in ("avg", "vs full")]
    columns += [f"{t} {k}" for k in ks for t in args.tasks]
    head = (
        f"{args.samples} samples per task and length (the same for every cache), seed {args.seed}, greedy; "
        f"sink={args.sink}, recent={args.recent} (aligned to block_size={args.block_size}); KV % counted at "
        f"{max(args.lengths)} tokens of a bf16 cache; compute dtype {args.dtype or 'of the checkpoint'}; "
        "mean ± 95% interval, `vs full`: "
        "paired difference on the same samples\n\n"
    )
    text = head + markdown_table(rows, columns) + "\n"
    (args.out / "ruler.md").write_text(text)
    plot(rows, shares, max(args.lengths), args.out / "ruler.png")
    print(text)
    return text


if __name__ == "__main__":
    main()
