"""run_pa: MindIE arguments, prompt files, and the printed answers and timings."""

import json

import pytest

from examples import run_pa


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
