"""run_pa: MindIE arguments, prompt files, and the printed answers and timings."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from atb_llm.entrypoints import run_pa

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_follow_mindie_names():
    args = run_pa.parse_args([])
    assert args.input_texts == ["What's deep learning?"]
    assert (args.max_batch_size, args.block_size, args.is_chat_model, args.ignore_eos) == (8, 128, False, False)


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\nsecond\n")
    assert run_pa.read_prompts(run_pa.parse_args(["--input_file", str(txt)])) == ["first", "second"]
    jl = tmp_path / "p.jsonl"
    jl.write_text(
        '"plain"\n{"prompt": "obj"}\n[{"role": "user", "content": "chat"}]\n'
        '{"messages": [{"role": "user", "content": "m"}]}\n'
    )
    got = run_pa.read_prompts(run_pa.parse_args(["--input_file", str(jl)]))
    assert got[:2] == ["plain", "obj"] and got[2][0]["content"] == "chat" and got[3][0]["content"] == "m"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: expected a string"):
        run_pa.read_prompts(run_pa.parse_args(["--input_file", str(bad)]))


def test_generates_and_reports_timings(tiny_models, capsys):
    path = tiny_models()
    outs = run_pa.main(
        [
            "--model_path",
            str(path),
            "--input_texts",
            "hello world",
            "the quick brown",
            "--max_output_length",
            "6",
            "--ignore_eos",
            "--block_size",
            "16",
            "--max_input_length",
            "64",
        ]
    )
    assert [len(o.token_ids) for o in outs] == [6, 6]
    printed = capsys.readouterr().out
    assert "Answer[1]:" in printed and "first token" in printed and "tokens/s" in printed


def test_too_long_prompt_is_a_clear_error(tiny_models):
    with pytest.raises(ValueError, match="more than max_input_length=4"):
        run_pa.main(
            [
                "--model_path",
                str(tiny_models()),
                "--input_texts",
                "hello world the quick brown fox",
                "--max_input_length",
                "4",
                "--block_size",
                "16",
            ]
        )


def run_pa_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "examples.run_pa", "--block_size", "16", "--max_input_length", "32", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_one_output_token_works(tiny_models):
    r = run_pa_cli("-m", str(tiny_models()), "--input_texts", "hi", "--max_output_length", "1", "--ignore_eos")
    assert r.returncode == 0, r.stderr
    assert "Generate[0]: 1 tokens" in r.stdout and "finish_reason=length" in r.stdout


def broken(tiny_models, tmp_path, what: str) -> tuple[list[str], str]:
    """A copy of the tiny model with one thing broken -> (run_pa arguments, the file the error must name)."""
    path = tmp_path / "m"
    shutil.copytree(tiny_models(), path)
    if what == "config":
        (path / "config.json").write_text('{"model_type": "qwen2", "hidden_size": 64,')
        return ["-m", str(path)], str(path / "config.json")
    if what == "safetensors":
        f = path / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return ["-m", str(path)], str(f)
    plan = tmp_path / "plan.json"
    plan.write_text('{"format": "mlgc-plan/1", "levels": [[')
    return ["-m", str(path), "--mlgc", str(plan)], str(plan)


@pytest.mark.parametrize("what", ["config", "safetensors", "plan"])
def test_broken_files_end_in_a_message_not_a_traceback(tiny_models, tmp_path, what):
    args, named = broken(tiny_models, tmp_path, what)
    r = run_pa_cli(*args, "--input_texts", "hi", "--max_output_length", "2")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.splitlines()[-1].startswith("run_pa: error: "), r.stderr
    assert named in r.stderr


def test_out_of_range_seed_is_refused_before_loading(tiny_models):
    r = run_pa_cli("-m", str(tiny_models()), "--temperature", "0.7", "--seed", str(2**64))
    assert r.returncode == 2 and "seed=18446744073709551616 is outside" in r.stderr
    assert "Loading weights" not in r.stderr
