"""run.sh arguments: every documented command parses to the expected run; malformed ones say why."""

from pathlib import Path

import pytest
from modeltest.args import RESULTS, PerfCase, parse_args
from modeltest.cli import main

W = "/weights/qwen2.5-7b"


def test_boolq_batch_then_model_weights_world():
    a = parse_args(f"pa_bf16 full_BoolQ 1 qwen2_mlgc {W} 1".split())
    assert (a.mode, a.dtype, a.test, a.batch_sizes, a.shots) == ("pa", "bf16", "full_BoolQ", (1,), 0)
    assert (a.model_name, a.weight_dir, a.world_size) == ("qwen2_mlgc", W, 1)
    assert (a.limit, a.mlgc, a.compare, a.out, a.data) == (None, "off", None, RESULTS, None)


@pytest.mark.parametrize("dataset", ["full_CEval", "full_MMLU"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_shot_datasets_take_shots_before_batch(dataset, dtype):
    a = parse_args(f"pa_{dtype} {dataset} 5 1 qwen2_mlgc {W} 1".split())
    assert (a.dtype, a.test, a.shots, a.batch_sizes, a.weight_dir) == (dtype, dataset, 5, (1,), W)
    assert parse_args(f"pa_{dtype} {dataset} 0 4 qwen2_mlgc".split()).shots == 0


def test_performance_cases_and_batch_forms():
    cases = "[[2048,2048],[1024,1024],[512,512],[256,256]]"
    a = parse_args(["pa_bf16", "performance", cases, "1", "qwen2_mlgc", W, "1"])
    assert a.cases == tuple(PerfCase(n, n, (1,)) for n in (2048, 1024, 512, 256))
    for batch in ("[1,8]", "1,8"):
        a = parse_args(["pa_fp16", "performance", "[[256,256],[512,512]]", batch, "qwen2_mlgc"])
        assert [c.batch_sizes for c in a.cases] == [(1, 8), (1, 8)]
    a = parse_args(["pa_fp32", "performance", "[[256,256],[512,512]]", "[[1,4],[2,8]]", "qwen2_mlgc"])
    assert a.cases == (PerfCase(256, 256, (1, 4)), PerfCase(512, 512, (2, 8)))


def test_performance_maxbs_takes_no_batch():
    a = parse_args(["pa_bf16", "performance_maxbs", "[[256,256],[512,512]]", "qwen2_mlgc", W, "1", "2048"])
    assert a.cases == (PerfCase(256, 256, ()), PerfCase(512, 512, ())) and a.max_position_embedding == 2048
    assert (a.cache_memory_gb, a.max_batch) == (None, 256)
    a = parse_args(["pa_bf16", "performance_maxbs", "[[256,256]]", "qwen2_mlgc", "--cache_memory_gb", "4"])
    assert a.cache_memory_gb == 4.0
    with pytest.raises(ValueError, match="--max_batch 0"):
        parse_args(["pa_bf16", "performance_maxbs", "[[256,256]]", "qwen2_mlgc", "--max_batch", "0"])


def test_weight_dir_optional_or_default():
    assert parse_args("pa_bf16 full_BoolQ 1 qwen2_mlgc".split()).weight_dir is None
    assert parse_args("pa_bf16 full_BoolQ 1 qwen2_mlgc default 1".split()).weight_dir is None
    a = parse_args("pa_bf16 full_BoolQ 1 qwen2_mlgc 1".split())  # only the world size
    assert (a.weight_dir, a.world_size) == (None, 1)
    assert parse_args(f"pa_bf16 full_BoolQ [1,8] qwen2_mlgc {W}".split()).batch_sizes == (1, 8)


def test_trailing_flags():
    argv = f"pa_bf16 full_MMLU 5 1 qwen2_mlgc {W} 1 --limit 8 --mlgc streaming --compare hf --out /tmp/r".split()
    a = parse_args(argv + ["--data", "/d", "--tie-margin", "0.01"])
    assert (a.limit, a.mlgc, a.compare, a.out, a.data, a.tie_margin) == (
        8,
        "streaming",
        "hf",
        Path("/tmp/r"),
        Path("/d"),
        0.01,
    )
    assert parse_args(f"pa_bf16 full_BoolQ 1 qwen2_mlgc --mlgc {W}/plan.json".split()).mlgc == f"{W}/plan.json"


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            "pa_bf16 full_GSM8K 1 qwen2_mlgc",
            "unknown test 'full_GSM8K'; choose one of performance, performance_maxbs, full_BoolQ",
        ),
        ("pa_bf16 performance [[2048,2048],[1024]] 1 qwen2_mlgc", "must be [input_length,output_length] pairs"),
        ("pa_bf16 performance [2048,2048] 1 qwen2_mlgc", "must be [input_length,output_length] pairs"),
        ("pa_bf16 performance [[2048,2048],[1024,1024] 1 qwen2_mlgc", "is malformed; write it like [[2048,2048]"),
        ("pa_bf16 performance [[2048,0]] 1 qwen2_mlgc", "must hold positive integers"),
        ("pa_bf16 performance [[256,256],[512,512]] [[1,4]] qwen2_mlgc", "has 1 lists but there are 2 case pairs"),
        ("pa_bf16 full_BoolQ x qwen2_mlgc", "batch size 'x' is malformed"),
        ("pa_bf16 full_BoolQ 5 1 qwen2_mlgc", "expected `full_BoolQ BATCH MODEL [WEIGHT_DIR] [WORLD_SIZE]`"),
        ("pa_bf16 full_MMLU 1 qwen2_mlgc", "expected `full_MMLU SHOTS BATCH MODEL"),
        ("pa_bf16 full_CEval five 1 qwen2_mlgc", "shots 'five' must be a whole number"),
        ("pa_int8 full_BoolQ 1 qwen2_mlgc", "mode 'pa_int8' is not supported; use pa_bf16, pa_fp16 or pa_fp32"),
        ("fa full_BoolQ 1 qwen2_mlgc", "mode 'fa' is not supported"),
        (f"pa_bf16 full_BoolQ 1 qwen2_mlgc {W} 0", "world size '0' must be a number of cards"),
        (f"pa_bf16 full_BoolQ 1 qwen2_mlgc {W} 2 --compare hf", "--compare runs at world size 1; drop it"),
        (f"pa_bf16 full_BoolQ 1 qwen2_mlgc {W} 1 2048", "unexpected argument(s) ['2048']"),
        ("pa_bf16 full_BoolQ 1 qwen2_mlgc --limit 0", "--limit 0 must be at least 1"),
        ("pa_bf16 performance [[8,8]] 1 qwen2_mlgc --limit 4", "--limit applies to datasets"),
    ],
)
def test_malformed_commands_say_what_is_wrong(argv, message):
    with pytest.raises(ValueError) as err:
        parse_args(argv.split())
    assert message in str(err.value)


def test_cli_exits_with_usage_and_reason(capsys):
    with pytest.raises(SystemExit) as done:
        main("pa_bf16 full_XYZ 1 qwen2_mlgc".split())
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "usage: bash tests/modeltest/run.sh" in err and "unknown test 'full_XYZ'" in err


def test_performance_takes_mindie_trailing_max_position_embedding():
    a = parse_args(f"pa_bf16 performance [[2048,2048],[256,256]] 1 qwen2_mlgc {W} 1 4096".split())
    assert a.max_position_embedding == 4096 and a.weight_dir == W and a.world_size == 1
    with pytest.raises(
        ValueError, match=r"case \[2048,2048\] needs 4096 positions, more than max_position_embedding=4000"
    ):
        parse_args(f"pa_bf16 performance [[2048,2048]] 1 qwen2_mlgc {W} 1 4000".split())
    assert parse_args(f"pa_bf16 performance [[256,256]] 1 qwen2_mlgc {W} 8 4096".split()).world_size == 8


def test_humaneval_takes_batch_then_model():
    a = parse_args(f"pa_bf16 full_HumanEval 8 qwen2_mlgc {W} 1 --style completion --limit 3".split())
    assert (a.test, a.batch_sizes, a.style, a.limit, a.max_new_tokens) == ("full_HumanEval", (8,), "completion", 3, 512)
    assert parse_args(f"pa_bf16 full_HumanEval_X 1 qwen2_mlgc {W} 1".split()).test == "full_HumanEval_X"
