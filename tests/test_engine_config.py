"""One settings surface: the engine's flags are declared once and build the config they describe."""

import argparse
from dataclasses import fields

import pytest

from atb_llm.entrypoints.openai.serve import parse_args as server_args
from atb_llm.entrypoints.run_pa import parse_args as run_pa_args
from atb_llm.runtime.engine_config import EngineConfig


def test_flags_build_the_config_they_name():
    p = EngineConfig.add_cli_args(argparse.ArgumentParser(), max_output_length=99)
    args = p.parse_args(["-m", "W", "--block_size", "32", "--mlgc", "auto", "--quantize", "w4a16", "--kv_quant", "c8"])
    cfg = EngineConfig.from_cli_args(args, progress=False)
    assert (cfg.model_path, cfg.block_size, cfg.mlgc, cfg.quantize, cfg.kv_quant) == ("W", 32, "auto", "w4a16", "c8")
    assert cfg.max_output_length == 99 and cfg.progress is False


def test_run_pa_and_server_share_the_flags_with_their_own_defaults():
    a, s = run_pa_args(["--dtype", "fp32"]), server_args(["--dtype", "fp32"])
    assert a.max_output_length == 128 and s.max_output_length == 512
    # the server prefills long prompts in chunks between decode steps; run_pa keeps MindIE's one piece
    assert (a.chunked_prefill, a.max_prefill_tokens) == (False, 8192)
    assert (s.chunked_prefill, s.max_prefill_tokens) == (True, 2048)
    assert not server_args(["--no-chunked_prefill"]).chunked_prefill
    shared = {"dtype", "device", "block_size", "num_blocks", "mlgc", "quantize", "kv_quant", "lora_modules"}
    assert {k: getattr(a, k) for k in shared} == {k: getattr(s, k) for k in shared}


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"quantize": "w2a16"}, "quantize='w2a16'"),
        ({"kv_quant": "c4"}, "kv_quant='c4'"),
        ({"dtype": "int8"}, "dtype"),
        ({"max_batch_size": 0}, "^max_batch_size=0 must be at least 1$"),
        ({"max_prefill_tokens": -3}, "^max_prefill_tokens=-3 must be at least 1$"),
    ],
)
def test_bad_settings_name_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig("W", **kw)


def test_every_field_is_a_documented_flag_that_parses_to_it():
    p = EngineConfig.add_cli_args(argparse.ArgumentParser())
    flags = {a.dest: a for a in p._actions if a.dest != "help"}
    assert set(flags) == {f.name for f in fields(EngineConfig)} - {"progress"}
    assert all(a.help for a in flags.values())
    assert EngineConfig.from_cli_args(p.parse_args([]), model_path="W") == EngineConfig("W")
    argv = "-m W --dtype bf16 --device cuda --max_batch_size 3 --max_input_length 100 --max_output_length 7"
    argv += " --max_prefill_tokens 64 --chunked_prefill --prefix_caching --block_size 32 --num_blocks 10"
    argv += " --cache_memory_gb 0.5 --mlgc auto --quantize w8a16 --kv_quant c8 --attention_backend triton"
    argv += " --enforce_eager --quantize_lm_head w4a16"
    want = EngineConfig(
        "W", "bf16", "cuda", 3, 100, 7, 64, True, True, 32, 10, 0.5, "auto", "w8a16", "c8", True, "triton", True,
        quantize_lm_head="w4a16",
    )  # fmt: skip
    assert EngineConfig.from_cli_args(p.parse_args(argv.split())) == want
    on = EngineConfig.add_cli_args(argparse.ArgumentParser(), chunked_prefill=True, prefix_caching=True)
    args = on.parse_args(["--no-chunked_prefill"])
    assert (args.chunked_prefill, args.prefix_caching) == (False, True)


@pytest.mark.parametrize(
    "flag, value", [("--quantize", "w2a16"), ("--quantize_lm_head", "c8"), ("--kv_quant", "c4"), ("--dtype", "int8")]
)
def test_a_flag_outside_its_choices_is_a_usage_error(flag, value, capsys):
    with pytest.raises(SystemExit):
        EngineConfig.add_cli_args(argparse.ArgumentParser()).parse_args([flag, value])
    assert f"argument {flag}: invalid choice: '{value}'" in capsys.readouterr().err
