"""Accuracy on a dataset: score every item through the engine (and, with --compare hf, through
transformers on the same token ids; with --compare lm_eval, through lm-eval's client against the
engine's OpenAI server), then write the per-item CSV, the per-category CSV and Markdown table, and
a JSON summary."""

from __future__ import annotations

import gc
import json
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

from tqdm import tqdm

from atb_llm.config import parse_dtype
from atb_llm.models.base.router import get_router
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.utils.default_model import resolve_model_path
from benchmarks.common import load_hf
from modeltest import report, variants
from modeltest.args import RunArgs
from modeltest.datasets import DATASETS, Task
from modeltest.scoring import best_option, encode_prompts, option_tokens, score_engine, score_hf, top_gap

REFERENCES = {"hf": ("hf", "transformers"), "lm_eval": ("lmeval", "lm-eval")}  # --compare: column prefix, name


def scored(task: Task, desc: str, run) -> tuple[list[list[float]], float]:
    """Calls run(on_item) under a progress bar showing the running accuracy; (log-probs, seconds)."""
    hits, start = 0, time.perf_counter()
    with tqdm(total=len(task.items), desc=desc, unit="q") as bar:

        def on_item(i: int, logprobs: list[float]) -> None:
            nonlocal hits
            hits += best_option(logprobs) == task.items[i].answer
            bar.set_postfix_str(f"acc={hits / (bar.n + 1):.4f}", refresh=False)
            bar.update(1)

        logprobs = run(on_item)
    return logprobs, time.perf_counter() - start


def item_rows(
    task: Task, ours: list[list[float]], theirs: list[list[float]] | None, margin: float, prefix: str = "hf"
) -> list[dict]:
    rows = []
    for n, item in enumerate(task.items):
        pred = best_option(ours[n])
        row = dict(id=item.id, subject=item.subject, category=item.category, expected=task.labels[item.answer])
        row.update(predicted=task.labels[pred], correct=int(pred == item.answer))
        row.update({f"logprob_{label}": f"{lp:.6f}" for label, lp in zip(task.labels, ours[n])})
        if theirs is not None:
            ref = best_option(theirs[n])
            row.update({f"{prefix}_predicted": task.labels[ref], f"{prefix}_correct": int(ref == item.answer)})
            row.update({f"{prefix}_logprob_{label}": f"{lp:.6f}" for label, lp in zip(task.labels, theirs[n])})
            row.update(agree=int(pred == ref), tie=int(min(top_gap(ours[n]), top_gap(theirs[n])) <= margin))
        rows.append(row)
    return rows


def agreement(rows: list[dict]) -> dict:
    """Share of items where both engines pick the same option: over all, and over the items where
    neither engine's two best options are within the tie margin."""
    clear = [r for r in rows if not r["tie"]]
    return dict(
        agreement_all=sum(r["agree"] for r in rows) / len(rows),
        agreement_no_ties=sum(r["agree"] for r in clear) / len(clear) if clear else None,
        tie_items=len(rows) - len(clear),
    )


def score_task(args: RunArgs, task: Task, model_path: str, device: str, batch_size: int) -> dict:
    """{"atb_llm": (log-probs, seconds)} and, with --compare, "reference": transformers on the same
    token ids, or lm-eval through the server."""
    tokenizer = get_router(model_path).get_tokenizer()
    options = option_tokens(tokenizer, task.options)
    prompts = encode_prompts(tokenizer, [item.prompt for item in task.items], options)
    cfg = EngineConfig(
        model_path,
        dtype=args.dtype,
        device=device,
        max_batch_size=batch_size,
        max_input_length=max(len(p) for p in prompts),
        max_output_length=1,
        mlgc=args.mlgc,
        progress=False,
        lora_modules=list(args.lora_modules) or None,
    )
    engine = LLMEngine(cfg)
    run = partial(score_engine, engine, prompts, options.ids, adapter=args.adapter)
    results = {"atb_llm": scored(task, f"{task.name} atb_llm", run)}
    adapter_path = engine.adapter_paths[args.adapter] if args.adapter else None
    del engine
    gc.collect()
    if args.compare == "hf":
        model = load_hf(model_path, parse_dtype(args.dtype)).to(device)
        if adapter_path is not None:  # transformers + peft
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_path)).eval()
        run = partial(score_hf, model, prompts, options.ids, batch_size)
        results["reference"] = scored(task, f"{task.name} transformers", run)
        del model
        gc.collect()
    if args.compare == "lm_eval":
        from atb_llm.entrypoints.openai.serve import free_port
        from modeltest.lm_eval_client import score_lm_eval

        if options.prefix:
            raise ValueError(f"--compare lm_eval needs options that are one token each; {task.options} are not")
        server_cfg = replace(cfg, max_input_length=cfg.max_input_length + 2)  # lm-eval adds the option token
        run = partial(score_lm_eval, task, model_path, server_cfg, free_port())
        results["reference"] = scored(task, f"{task.name} lm-eval via server", run)
    return results


def evaluate(args: RunArgs, task: Task, model_path: str, device: str, batch_size: int) -> tuple[dict, list[dict]]:
    """Scores the task and writes its files; (summary, per-item rows)."""
    results = score_task(args, task, model_path, device, batch_size)
    (ours, ours_s), (theirs, theirs_s) = results["atb_llm"], results.get("reference", (None, None))
    prefix, name = REFERENCES.get(args.compare, ("hf", "transformers"))
    rows = item_rows(task, ours, theirs, args.tie_margin, prefix)
    acc = report.category_accuracy(task, [bool(r["correct"]) for r in rows])
    ref = report.category_accuracy(task, [bool(r[f"{prefix}_correct"]) for r in rows]) if theirs is not None else None
    categories = report.merge_accuracy(acc, ref)
    summary = dict(
        dataset=task.name,
        items=len(rows),
        shots=task.shots,
        batch_size=batch_size,
        dtype=args.dtype,
        mlgc=args.mlgc,
        adapter=args.adapter,
        model=model_path,
        device=device,
        accuracy=acc[-1]["accuracy"],
        seconds=round(ours_s, 2),
    )
    if theirs is not None:
        summary.update(reference=name, ref_accuracy=ref[-1]["accuracy"])
        summary.update(diff_points=100 * (acc[-1]["accuracy"] - ref[-1]["accuracy"]))
        summary.update(agreement(rows), tie_margin=args.tie_margin, ref_seconds=round(theirs_s, 2))
        diffs = [abs(a - b) for o, t in zip(ours, theirs) for a, b in zip(o, t)]
        summary.update(max_logprob_diff=max(diffs))
    write(args, task, device, rows, categories, summary)
    return summary, rows


def file_stem(args: RunArgs, task: Task, batch_size: int, cache: str | None = None) -> str:
    """<dataset>_<shots>shot_batch<N>_tp<world>_<cache>[_first<limit>]; cache: mlgc-<tag> by default."""
    cache = (cache or f"mlgc-{report.mlgc_tag(args.mlgc)}") + (f"_lora-{args.adapter}" if args.adapter else "")
    stem = f"{task.name.lower()}_{task.shots}shot_batch{batch_size}_tp{args.world_size}_{cache}"
    return stem + (f"_first{args.limit}" if args.limit else "")


def summary_lines(s: dict) -> list[str]:
    lines = [
        f"[{s['dataset']}] {s['items']} items, {s['shots']}-shot, batch {s['batch_size']}, {s['dtype']}, "
        f"mlgc {s['mlgc']}, adapter {s.get('adapter') or 'none'}: accuracy {s['accuracy']:.4f} ({s['seconds']:.1f} s)"
    ]
    if "ref_accuracy" in s:
        clear = "n/a" if s["agreement_no_ties"] is None else f"{s['agreement_no_ties']:.4f}"
        lines.append(
            f"[{s['dataset']}] {s['reference']} accuracy {s['ref_accuracy']:.4f} ({s['ref_seconds']:.1f} s); "
            f"difference {s['diff_points']:+.2f} points; agreement {s['agreement_all']:.4f} over all items, "
            f"{clear} without the {s['tie_items']} near-tie items (margin {s['tie_margin']:g}); "
            f"largest option log-prob difference {s['max_logprob_diff']:.2e}"
        )
    return lines


def write(args: RunArgs, task: Task, device: str, rows: list[dict], categories: list[dict], summary: dict) -> Path:
    out = report.results_dir(args, "precision", device)
    stem = file_stem(args, task, summary["batch_size"])
    report.write_csv(out / f"{stem}_items.csv", rows)
    report.write_csv(out / f"{stem}_result.csv", categories)
    table = report.accuracy_markdown(categories, reference=summary.get("reference", "transformers"))
    text = "\n".join([table, "", *summary_lines(summary)]) + "\n"
    (out / f"{stem}_result.md").write_text(text, encoding="utf-8")
    (out / f"{stem}_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"\n{text}\nresults: {out}/{stem}_*")
    return out


def run_precision(args: RunArgs) -> list[dict]:
    """One summary per batch size; with --variant, one per variant and batch size, and per batch
    size a table of the variants side by side."""
    task = DATASETS[args.test].load(args.shots, args.data).head(args.limit)
    device = report.resolve_device(args.device)
    if not args.variants:
        model_path = str(resolve_model_path(args.weight_dir))
        return [evaluate(args, task, model_path, device, batch_size)[0] for batch_size in args.batch_sizes]
    summaries = []
    for batch_size in args.batch_sizes:
        runs = []
        for v in variants.variants(args):
            summary, rows = evaluate(variants.args_for(args, v), task, str(resolve_model_path(v.weight_dir)), device,
                                     batch_size)  # fmt: skip
            runs.append((v, summary, [dict(id=r["id"], answer=r["predicted"]) for r in rows]))
            summaries.append(summary)
        table = variants.side_by_side(runs, "accuracy", "answer")
        title = f"{task.name}, {len(task.items)} items, {task.shots}-shot, batch {batch_size}, {args.dtype}"
        stem = file_stem(args, task, batch_size, cache="variants")
        variants.write(report.results_dir(args, "precision", device), stem, title, table)
    return summaries
