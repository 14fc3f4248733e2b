"""One settings surface: the engine's flags are declared once and build the config they describe."""

import argparse

import pytest

from atb_llm.runtime.engine_config import EngineConfig
from examples.run_pa import parse_args as run_pa_args
from examples.server.serve import parse_args as server_args


def test_flags_build_the_config_they_name():
    p = EngineConfig.add_cli_args(argparse.ArgumentParser(), max_output_length=99)
    args = p.parse_args(["-m", "W", "--block_size", "32", "--mlgc", "auto", "--quantize", "w4a16", "--kv_quant", "c8"])
    cfg = EngineConfig.from_cli_args(args, progress=False)
    assert (cfg.model_path, cfg.block_size, cfg.mlgc, cfg.quantize, cfg.kv_quant) == ("W", 32, "auto", "w4a16", "c8")
    assert cfg.max_output_length == 99 and cfg.progress is False


def test_run_pa_and_server_share_the_flags_with_their_own_defaults():
    a, s = run_pa_args(["--dtype", "fp32"]), server_args(["--dtype", "fp32"])
    assert a.max_output_length == 128 and s.max_output_length == 512
    shared = {"dtype", "device", "block_size", "num_blocks", "mlgc", "quantize", "kv_quant", "max_prefill_tokens"}
    assert {k: getattr(a, k) for k in shared} == {k: getattr(s, k) for k in shared}


@pytest.mark.parametrize(
    "kw, match",
    [({"quantize": "w2a16"}, "quantize='w2a16'"), ({"kv_quant": "c4"}, "kv_quant='c4'"), ({"dtype": "int8"}, "dtype")],
)
def test_bad_settings_name_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig("W", **kw)
