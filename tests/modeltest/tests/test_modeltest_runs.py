"""Whole runs on a tiny model through run.sh's entry point: the results layout, the per-item and
per-category CSVs (category grouping, counts consistent with the items), the comparison with
transformers, and the performance CSV, table and plot."""

import csv
import json

import pytest
from modeltest.args import parse_args
from modeltest.cli import main
from modeltest.datasets import Item, Task
from modeltest.report import category_accuracy, merge_accuracy
from modeltest.variants import variants


def read_csv(path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


CASES = {  # dataset -> (expected ids, item counts of STEM, Social Science(s), Humanities, Other)
    "full_MMLU": (["abstract_algebra-0", "abstract_algebra-1", "marketing-0", "philosophy-0"], [2, 0, 1, 1]),
    "full_CEval": (["computer_network-0", "computer_network-1", "law-0", "modern_chinese_history-0"], [2, 0, 2, 0]),
}


@pytest.mark.parametrize("dataset", list(CASES))
def test_precision_run_writes_items_categories_and_comparison(dataset, tiny_models, mmlu_dir, ceval_dir, tmp_path):
    data = mmlu_dir if dataset == "full_MMLU" else ceval_dir
    out = tmp_path / "results"
    argv = ["pa_fp32", dataset, "1", "[1,4]", "qwen2_mlgc", str(tiny_models()), "1", "--compare", "hf"]
    summaries = main(argv + ["--data", str(data), "--out", str(out)])
    folder = out / "CPU" / "precision_test" / "pa" / "fp32" / "qwen2_mlgc"
    name = dataset.removeprefix("full_").lower()
    ids, counts = CASES[dataset]
    for summary, batch in zip(summaries, (1, 4)):
        stem = folder / f"{name}_1shot_batch{batch}_tp1_mlgc-off"
        items = read_csv(f"{stem}_items.csv")
        assert list(items[0]) == [
            *"id subject category expected predicted correct".split(),
            *[f"logprob_{c}" for c in "ABCD"],
            *["hf_predicted", "hf_correct"],
            *[f"hf_logprob_{c}" for c in "ABCD"],
            *["agree", "tie"],
        ]
        assert [r["id"] for r in items] == ids
        for r in items:
            lps = [float(r[f"logprob_{c}"]) for c in "ABCD"]
            assert r["predicted"] == "ABCD"[lps.index(max(lps))]
            assert r["correct"] == str(int(r["predicted"] == r["expected"]))
            hf = [float(r[f"hf_logprob_{c}"]) for c in "ABCD"]
            assert max(abs(a - b) for a, b in zip(lps, hf)) < 1e-3  # fp32: the same numbers
        categories = read_csv(f"{stem}_result.csv")
        assert [r["category"] for r in categories][-1] == "Avg acc"
        assert [int(r["items"]) for r in categories] == counts + [4]
        assert int(categories[-1]["correct"]) == sum(int(r["correct"]) for r in items)
        assert float(categories[-1]["accuracy"]) == summary["accuracy"] == int(categories[-1]["correct"]) / 4
        saved = json.loads(open(f"{stem}_summary.json").read())
        assert saved["agreement_all"] == 1.0 and saved["diff_points"] == 0.0 and saved["batch_size"] == batch
        assert "| Avg acc | 4 |" in open(f"{stem}_result.md", encoding="utf-8").read()


def test_limited_run_prints_table_and_spans_subjects(tiny_models, mmlu_dir, tmp_path, capsys):
    argv = ["pa_fp32", "full_MMLU", "0", "2", "qwen2_mlgc", str(tiny_models()), "--data", str(mmlu_dir)]
    (summary,) = main(argv + ["--limit", "2", "--out", str(tmp_path)])
    assert summary["items"] == 2 and "ref_accuracy" not in summary
    printed = capsys.readouterr().out
    assert "| category | items | atb_llm |" in printed and "[MMLU] 2 items, 0-shot, batch 2, fp32" in printed
    items = read_csv(tmp_path / "CPU/precision_test/pa/fp32/qwen2_mlgc/mmlu_0shot_batch2_tp1_mlgc-off_first2_items.csv")
    assert [r["subject"] for r in items] == ["abstract_algebra", "philosophy"]  # the sample spans subjects


def test_category_accuracy_is_over_items_in_task_order():
    items = [Item(str(n), "", 0, f"s{n}", c) for n, c in enumerate(["B", "A", "A", "A"])]
    task = Task("T", (" x", " y"), ("x", "y"), ("A", "B", "C"), tuple(items))
    rows = category_accuracy(task, [True, True, False, False])
    assert [(r["category"], r["items"], r["correct"]) for r in rows] == [
        ("A", 3, 1),
        ("B", 1, 1),
        ("C", 0, 0),
        ("Avg acc", 4, 2),
    ]
    assert [r["accuracy"] for r in rows][::3] == [1 / 3, 0.5]
    merged = merge_accuracy(rows, category_accuracy(task, [True, True, True, False]))
    assert merged[-1]["diff"] == -0.25 and merged[0]["ref_accuracy"] == 2 / 3


def test_performance_run_writes_csv_table_and_plot(tiny_models, tmp_path, capsys):
    argv = ["pa_fp32", "performance", "[[16,4],[8,2]]", "[1,2]", "qwen2_mlgc", str(tiny_models()), "1", "20"]
    rows = main(argv + ["--compare", "hf", "--out", str(tmp_path)])
    folder = tmp_path / "CPU" / "performance_test" / "pa" / "fp32" / "qwen2_mlgc"
    stem = folder / "performance_16x4_8x2_batch1-2_tp1_mlgc-off"
    saved = read_csv(f"{stem}_result.csv")
    assert [(r["engine"], r["batch_size"], r["input_length"], r["output_length"]) for r in saved] == [
        (e, b, i, o) for e in ("atb_llm", "transformers") for i, o in (("16", "4"), ("8", "2")) for b in ("1", "2")
    ]
    assert list(saved[0]) == [
        *"batch_size input_length output_length engine first_token_ms non_first_token_ms".split(),
        *"e2e_tokens_per_s response_time_ms peak_memory_gb kv_cache_bytes e2e_vs_hf".split(),
    ]
    for r in saved:  # the model zoo's definition: E2E throughput = batch_size * output_length / ResponseTime
        e2e = int(r["batch_size"]) * int(r["output_length"]) / (float(r["response_time_ms"]) / 1000)
        assert float(r["e2e_tokens_per_s"]) == pytest.approx(e2e)
    ours = [r for r in rows if r["engine"] == "atb_llm"]
    assert all(r["e2e_tokens_per_s"] > 0 and r["first_token_ms"] > 0 and r["kv_cache_bytes"] > 0 for r in ours)
    hf = {(r["batch_size"], r["input_length"]): r["e2e_tokens_per_s"] for r in rows if r["engine"] == "transformers"}
    assert all(
        r["e2e_vs_hf"] == pytest.approx(r["e2e_tokens_per_s"] / hf[r["batch_size"], r["input_length"]]) for r in ours
    )
    assert open(f"{stem}_throughput.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| batch_size | input length | output length | engine | first token (ms) |" in printed


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_lm_eval_through_the_server_gives_the_engine_log_probs(tiny_models, tmp_path):
    """lm-eval's own client (local-completions, a separate process) against the OpenAI server scores
    the items to the same log-probabilities as modeltest's direct engine scoring (fp32). The tiny
    tokenizer has " fox" and " dog" as single tokens (its corpus is tests/tiny.py's TEXT)."""
    pytest.importorskip("lm_eval")
    from modeltest.args import parse_args
    from modeltest.datasets import Item, Task
    from modeltest.precision import evaluate

    prompts = ["the quick brown", "jumps over the lazy", "def return if else the", "hello world the"]
    items = tuple(Item(f"t-{i}", p, i % 2) for i, p in enumerate(prompts))
    task = Task("Words", (" fox", " dog"), ("fox", "dog"), (), items)
    argv = ["pa_fp32", "full_BoolQ", "2", "qwen2_mlgc", str(tiny_models()), "1", "--compare", "lm_eval"]
    args = parse_args(argv + ["--out", str(tmp_path)])
    summary, _ = evaluate(args, task, str(tiny_models()), "cpu", 2)
    assert summary["reference"] == "lm-eval" and summary["items"] == 4
    assert summary["agreement_all"] == 1.0 and summary["max_logprob_diff"] < 1e-4
    stem = tmp_path / "CPU" / "precision_test" / "pa" / "fp32" / "qwen2_mlgc" / "words_0shot_batch2_tp1_mlgc-off"
    rows = read_csv(f"{stem}_items.csv")
    assert [r["lmeval_predicted"] for r in rows] == [r["predicted"] for r in rows]
    assert "| category | items | atb_llm | lm-eval | diff |" in open(f"{stem}_result.md", encoding="utf-8").read()


def test_performance_maxbs_runs_each_case_at_the_largest_batch_that_fits(tiny_models, tmp_path, capsys):
    """The tiny model in fp32, block 128: a block of one group is 2 x 128 x 16 x 4 B = 16 KiB, and
    4 groups. 0.5 MiB of cache = 32 blocks: 8 sequences of up to 128 tokens, 4 of up to 256."""
    argv = ["pa_fp32", "performance_maxbs", "[[16,4],[120,20]]", "qwen2_mlgc", str(tiny_models()), "1"]
    rows = main(argv + ["--cache_memory_gb", str(0.5 / 1024), "--max_batch", "16", "--out", str(tmp_path)])
    assert [(r["batch_size"], r["input_length"]) for r in rows] == [(8, 16), (4, 120)]
    folder = tmp_path / "CPU" / "performance_test" / "pa" / "fp32" / "qwen2_mlgc"
    saved = read_csv(folder / "performance_maxbs_16x4_120x20_batchmax_tp1_mlgc-off_result.csv")
    assert [r["batch_size"] for r in saved] == ["8", "4"]
    assert "batch 8 at [16,4], 4 at [120,20]" in capsys.readouterr().out
    rows = main(argv + ["--cache_memory_gb", str(0.5 / 1024), "--max_batch", "5", "--out", str(tmp_path)])
    assert [r["batch_size"] for r in rows] == [5, 4]


def test_variants_side_by_side_compare_each_item_with_the_first(tiny_models, mmlu_dir, tmp_path, capsys):
    first, other = tiny_models(), tiny_models(seed=3, std=0.6)
    argv = ["pa_fp32", "full_MMLU", "0", "2", "qwen2_mlgc", str(first), "--data", str(mmlu_dir), "--out", str(tmp_path)]
    summaries = main(argv + ["--variant", str(other), "--variant", f"{first}@streaming"])
    folder = tmp_path / "CPU/precision_test/pa/fp32/qwen2_mlgc"
    names = [first.name, other.name, f"{first.name}+mlgc-streaming"]
    caches = ["off", "off", "streaming"]
    answers = [[r["predicted"] for r in read_csv(folder / n / f"mmlu_0shot_batch2_tp1_mlgc-{c}_items.csv")]
               for n, c in zip(names, caches)]  # fmt: skip
    assert [s["mlgc"] for s in summaries] == caches
    table = json.loads((folder / "mmlu_0shot_batch2_tp1_variants.json").read_text())
    assert [row["variant"] for row in table] == names
    for row, s, mine in zip(table, summaries, answers):
        same = sum(a == b for a, b in zip(mine, answers[0])) / 4
        assert row["agreement"] == f"{same:.4f}" and row["accuracy"] == f"{s['accuracy']:.4f}"
        assert row["diff_points"] == f"{100 * (s['accuracy'] - summaries[0]['accuracy']):+.2f}"
    assert answers[1] != answers[0]  # another model: the comparison has something to find
    assert table[2]["agreement"] == "1.0000"  # prefill scores do not depend on the KV cache's compression
    assert f"| {names[1]} |" in capsys.readouterr().out


def test_variant_errors_name_the_value(tiny_models, tmp_path):
    base = ["pa_fp32", "full_BoolQ", "1", "qwen2_mlgc", str(tiny_models())]
    with pytest.raises(ValueError, match=r"--variant '/nowhere@streaming': '/nowhere' is not a folder"):
        parse_args(base + ["--variant", "/nowhere@streaming"])
    with pytest.raises(ValueError, match="names no weight folder"):
        parse_args(base + ["--variant", "@streaming"])
    with pytest.raises(ValueError, match="not to performance"):
        parse_args(["pa_fp32", "performance", "[[4,4]]", "1", "qwen2_mlgc", "--variant", "default"])
    same = parse_args(base + ["--variant", str(tiny_models()), "--variant", "default@random"])
    assert [v.name for v in variants(same)][1:] == [f"{tiny_models().name}-2", "default+mlgc-random"]


def test_an_adapter_is_scored_beside_the_base_against_transformers_and_peft(tiny_models, mmlu_dir, tmp_path):
    from tiny import make_adapter

    lora = make_adapter(tiny_models(), tmp_path / "lora", seed=4)
    argv = ["pa_fp32", "full_MMLU", "0", "2", "qwen2_mlgc", str(tiny_models()), "--data", str(mmlu_dir),
            "--out", str(tmp_path), "--compare", "hf", "--lora_modules", f"sql={lora}"]  # fmt: skip
    (base,) = main(argv)
    (adapted,) = main(argv + ["--adapter", "sql"])
    assert adapted["adapter"] == "sql" and base["adapter"] is None
    assert adapted["agreement_all"] == 1.0 and adapted["max_logprob_diff"] < 1e-3  # = transformers + peft
    folder = tmp_path / "CPU" / "precision_test" / "pa" / "fp32" / "qwen2_mlgc"
    base_items = read_csv(folder / "mmlu_0shot_batch2_tp1_mlgc-off_items.csv")
    lora_items = read_csv(folder / "mmlu_0shot_batch2_tp1_mlgc-off_lora-sql_items.csv")
    assert [r["logprob_A"] for r in base_items] != [r["logprob_A"] for r in lora_items]  # the adapter was applied
    with pytest.raises(ValueError, match="--adapter with --compare lm_eval is not supported"):
        parse_args([*argv[:-4], "--compare", "lm_eval", "--adapter", "sql"])


def test_the_chip_count_runs_that_many_ranks(tiny_models, mmlu_dir, tmp_path):
    """World size 2: modeltest starts itself under torchrun; rank 0 writes the same accuracy and
    log-probabilities as world size 1, in files named tp2."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    model = tiny_models(heads=8, kv_heads=4, hidden=64)
    argv = ["pa_fp32", "full_MMLU", "0", "2", "qwen2_mlgc", str(model)]
    flags = ["--data", str(mmlu_dir), "--out", str(tmp_path), "--limit", "4"]
    (one,) = main([*argv, "1", *flags])
    here = Path(__file__).resolve().parents[1]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{here}:{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "modeltest", *argv, "2", *flags], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "CPU" / "precision_test" / "pa" / "fp32" / "qwen2_mlgc"
    two = json.loads((folder / "mmlu_0shot_batch2_tp2_mlgc-off_first4_summary.json").read_text())
    assert two["accuracy"] == one["accuracy"]
    a = read_csv(folder / "mmlu_0shot_batch2_tp1_mlgc-off_first4_items.csv")
    b = read_csv(folder / "mmlu_0shot_batch2_tp2_mlgc-off_first4_items.csv")
    assert [r["predicted"] for r in a] == [r["predicted"] for r in b]
    assert max(abs(float(x[f"logprob_{c}"]) - float(y[f"logprob_{c}"])) for x, y in zip(a, b) for c in "ABCD") < 1e-4
