"""Plans: file round trip, mismatch errors, baselines, calibration determinism, --mlgc wiring."""

import json
import random
import re
import shutil

import pytest
import torch
from tiny import hf_greedy

from atb_llm.compression.layout import GroupLayout
from atb_llm.compression.levels import FullInt8, Level, Window, WindowInt8
from atb_llm.compression.plan import PLAN_NAME, MlgcPlan, aligned_recent, baseline_plan, describe, resolve_layout
from atb_llm.entrypoints import calibrate as calibrate_cli
from atb_llm.entrypoints import run_pa
from atb_llm.models.qwen2_mlgc.config_qwen2_mlgc import load_qwen2_config
from atb_llm.runtime.calibration import CalibrationConfig, ProbeBackend, calibrate, choose_full, probe_tokens
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams

BS = 16


CAL = CalibrationConfig(full_ratio=0.5, sink=4, recent=20, block_size=16, samples=2, period=24)


@pytest.fixture(scope="module")
def plan(tiny):
    return calibrate(str(tiny), CAL, progress=False)


def test_aligned_recent_fills_whole_blocks():
    assert aligned_recent(64, 1024, 128) == 1087  # 64 + 1087 + 1 = 9 blocks of 128
    assert aligned_recent(4, 20, 16) == 27
    for sink in (0, 1, 4, 15, 16):
        for recent in (1, 2, 11, 12, 13, 16, 40):
            got = aligned_recent(sink, recent, 16)  # the fewest whole blocks that hold what was asked
            assert (sink + got + 1) % 16 == 0 and recent <= got < recent + 16, (sink, recent)
    with pytest.raises(ValueError, match="sink=0 must be >= 0 and recent=0 >= 1"):
        aligned_recent(0, 0, 16)
    with pytest.raises(ValueError, match="sink=-1"):
        aligned_recent(-1, 4, 16)


def test_calibration_is_deterministic_for_a_seed(tiny, plan):
    again = calibrate(str(tiny), CAL, progress=False)
    assert again.levels == plan.levels and again.scores == plan.scores
    other = calibrate(str(tiny), CalibrationConfig(**{**CAL.__dict__, "seed": 1}), progress=False)
    assert other.scores != plan.scores
    # what made the plan is recorded with it (checked here: the first test that builds the fixture)
    assert (again.calibration, other.calibration["seed"]) == ({"seed": 0, "samples": 2, "period": 24, "repeats": 2}, 1)


def hf_probe_scores(path, prompts, period):
    """Echo and induction scores from transformers' eager attention weights: per query head the mean
    probability at t - period and t - period + 1 over the repeated rows t, then the max over the
    query heads of each KV group. -> ([layers, kv_heads], [layers, kv_heads]) float64."""
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    cfg = model.config
    echo = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads, dtype=torch.float64)
    induction = torch.zeros_like(echo)
    rows = 0
    for tokens in prompts:
        with torch.no_grad():
            att = model(torch.tensor([tokens]), output_attentions=True).attentions  # [1, heads, T, T] per layer
        for t in range(period, len(tokens)):
            for layer, a in enumerate(att):
                echo[layer] += a[0, :, t, t - period].double()
                induction[layer] += a[0, :, t, t - period + 1].double()
            rows += 1
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    return tuple(
        (x / rows).view(cfg.num_hidden_layers, cfg.num_key_value_heads, group).amax(-1) for x in (echo, induction)
    )


def test_calibration_scores_are_the_models_attention_to_echo_and_induction(tiny, plan):
    echo, induction = hf_probe_scores(tiny, probe_tokens(CAL, 320), CAL.period)
    assert torch.allclose(torch.tensor(plan.scores["echo"], dtype=torch.float64), echo, atol=1e-6)
    assert torch.allclose(torch.tensor(plan.scores["induction"], dtype=torch.float64), induction, atol=1e-6)
    # the full groups are the ones these scores choose
    flat = [sum(plan.scores[name], []) for name in ("echo", "induction")]
    full = {i for i, level in enumerate(sum(plan.levels, [])) if level == "full"}
    assert full == choose_full(*flat, 2)


def test_probe_backend_scores_a_batch_and_leaves_the_output_unchanged(tiny):
    """Two probe prompts of different lengths in one prefill: each sequence is scored on its own rows,
    and the probe only watches (greedy tokens equal transformers')."""
    prompts = [p[: 2 * CAL.period - 5 * i] for i, p in enumerate(probe_tokens(CAL, 320))]
    probe = ProbeBackend(2, 4, CAL.period)
    engine = LLMEngine(EngineConfig(str(tiny), dtype="fp32", block_size=16, progress=False), backend=probe)
    outs = engine.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    assert [o.token_ids for o in outs] == hf_greedy(tiny, prompts, 6)
    for got, want in zip(probe.group_scores(2), hf_probe_scores(tiny, prompts, CAL.period)):
        assert torch.allclose(got, want, atol=1e-6)
    chunked = EngineConfig(str(tiny), dtype="fp32", block_size=16, max_prefill_tokens=16, chunked_prefill=True)
    engine = LLMEngine(chunked, backend=ProbeBackend(2, 4, CAL.period))
    with pytest.raises(RuntimeError, match="calibration probes whole prompts; run it without chunked prefill"):
        engine.generate(prompts[:1], SamplingParams(max_tokens=1))


def test_plan_keeps_the_budget_and_its_scores(plan):
    assert plan.counts() == {"full": 2, "window": 2}
    assert (plan.sink, plan.recent, plan.block_size) == (4, 27, 16)
    assert [len(r) for r in plan.scores["echo"]] == [2, 2] and len(plan.scores["induction"]) == 2
    assert plan.calibration == {"seed": 0, "samples": 2, "period": 24, "repeats": 2}
    assert (plan.method, plan.full_ratio) == ("razor", 0.5)


def test_probe_tokens_are_period_periodic_random_sequences():
    cfg = CalibrationConfig(samples=3, period=10, repeats=3, seed=5)
    probes = probe_tokens(cfg, 320)
    assert len(probes) == 3 and all(len(p) == 30 and p[:10] * 3 == p for p in probes)
    assert len({tuple(p[:10]) for p in probes}) == 3
    many = probe_tokens(CalibrationConfig(samples=64, period=256, repeats=1), 320)
    assert {t for p in many for t in p} == set(range(100, 320))  # uniform over [100, vocab)


def test_calibration_longer_than_the_default_input_limit(tiny, capsys):
    """The probe's prompt length sets the engine's input limit (the default would refuse 2 x 1100
    tokens); with progress on, loading and probing both show a bar."""
    cfg = CalibrationConfig(full_ratio=0.25, sink=4, recent=20, block_size=16, samples=1, period=1100)
    assert calibrate(str(tiny), cfg, progress=True).counts() == {"full": 1, "window": 3}
    err = capsys.readouterr().err
    assert "Loading weights" in err and "Generating" in err


def test_choose_full_takes_echo_then_induction():
    echo = [0.9, 0.1, 0.0, 0.0, 0.0]
    induction = [0.0, 0.2, 0.8, 0.7, 0.1]
    assert choose_full(echo, induction, 3) == {0, 2, 3}
    assert choose_full(echo, induction, 0) == set()


def test_round_trip(tmp_path, plan):
    path = plan.save(tmp_path / "p.json")
    assert MlgcPlan.load(path) == plan
    assert json.loads(path.read_text())["format"] == "mlgc-plan/1"


def test_plan_for_another_model_is_refused(tiny, plan, tmp_path):
    config = load_qwen2_config(tiny)
    with pytest.raises(ValueError, match="aligned to block_size=16; run with --block_size 16"):
        plan.check(config, 128)
    other = MlgcPlan(**{**plan.__dict__, "config_hash": "0123456789abcdef"})
    with pytest.raises(ValueError, match="made for a model with config hash 0123456789abcdef.*calibrate.sh"):
        other.check(config, 16)
    bigger = MlgcPlan(**{**plan.__dict__, "num_layers": 3, "levels": plan.levels + [["full", "full"]]})
    with pytest.raises(ValueError, match="3 layers x 2 KV heads = 6 groups, the model 2 x 2 = 4"):
        bigger.check(config, 16)


def test_bad_plan_files(tmp_path, plan):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"levels": []}))
    with pytest.raises(ValueError, match="is not an MLGC plan .*; make one with .*calibrate.sh -m WEIGHT_DIR$"):
        MlgcPlan.load(path)
    raw = json.loads(plan.save(tmp_path / "p.json").read_text())
    raw["levels"][0][0] = "tiny"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"unknown level\(s\) \['tiny'\]"):
        MlgcPlan.load(path)


def test_auto_without_a_plan_says_how_to_make_one(tiny):
    config = load_qwen2_config(tiny)
    with pytest.raises(FileNotFoundError, match="no MLGC plan at .*mlgc_plan.json; make one with bash examples/"):
        resolve_layout("auto", tiny, config, 16)


def test_mlgc_names_resolve_to_their_layouts(tiny):
    config = load_qwen2_config(tiny)
    full = resolve_layout(None, tiny, config, 16)
    assert full == resolve_layout(" off ", tiny, config, 16) and {lv.name for lv in full.levels} == {"full"}
    assert resolve_layout("streaming", tiny, config, 16) == baseline_plan("streaming", config, 16).to_layout()
    assert resolve_layout("random", tiny, config, 16) == baseline_plan("random", config, 16).to_layout()


def test_baselines(tiny):
    config = load_qwen2_config(tiny)
    streaming = baseline_plan("streaming", config, 16, sink=4, recent=20)
    assert streaming.counts() == {"window": 4}
    rnd = baseline_plan("random", config, 16, sink=4, recent=20, full_ratio=0.5, seed=3)
    assert rnd.counts() == {"full": 2, "window": 2}
    assert rnd.levels == baseline_plan("random", config, 16, 4, 20, 0.5, seed=3).levels
    assert baseline_plan("streaming", config, 16, int8=True).counts() == {"window_int8": 4}
    assert (streaming.method, streaming.full_ratio, streaming.calibration) == ("streaming", 0.0, {})
    assert (rnd.method, rnd.full_ratio, rnd.calibration) == ("random", 0.5, {"seed": 3})


def test_calibrate_command_writes_auto_plan_and_run_pa_uses_it(tiny, tmp_path, capsys):
    model = shutil.copytree(tiny, tmp_path / "m")
    argv = [
        "-m",
        str(model),
        "--full_ratio",
        "0.5",
        "--sink",
        "4",
        "--recent",
        "20",
        "--block_size",
        "16",
        "--samples",
        "2",
        "--period",
        "24",
    ]
    out = calibrate_cli.main(argv)
    assert out == model / PLAN_NAME
    printed = capsys.readouterr().out
    assert "layer g0 g1" in printed and "KV bytes per token at  4096 tokens" in printed
    common = [
        "--model_path",
        str(model),
        "--input_texts",
        "hello world the quick brown fox jumps over the lazy dog",
        "--max_output_length",
        "40",
        "--ignore_eos",
        "--block_size",
        "16",
        "--max_input_length",
        "64",
    ]
    (with_plan,) = run_pa.main(common + ["--mlgc", "auto"])
    report = capsys.readouterr().out
    (without,) = run_pa.main(common + ["--mlgc", "off"])
    assert len(with_plan.token_ids) == len(without.token_ids) == 40
    # the engine's own layout is the plan's: two full groups and two window groups (4 + 20 + 1 slots)
    assert "full: 2 groups" in report and "window: 2 groups, peak 4 blocks" in report


def test_describe_draws_the_layer_by_group_grid():
    window = Window(sink=4, recent=27)
    layout = GroupLayout(2, 3, (Level(), window, FullInt8(), WindowInt8(sink=2, recent=13), Level(), window))
    assert describe(layout).splitlines() == [
        "layer g0 g1 g2",
        "    0  F  W  f",
        "    1  w  F  W",
        "window: window(sink=4, recent=27), window_int8(sink=2, recent=13)",
    ]
    assert describe(GroupLayout.uniform(1, 2)).splitlines() == ["layer g0 g1", "    0  F  F"]  # no windows, no line


# ---- plans -------------------------------------------------------------------------------------
def engine_with_plan(path, plan_path, block_size=BS):
    cfg = EngineConfig(str(path), block_size=block_size, max_input_length=64, max_output_length=8, progress=False)
    cfg.mlgc = str(plan_path)
    return LLMEngine(cfg)


def test_plans_for_another_model_or_block_size_are_refused_where_engines_load_them(tiny, tmp_path):
    engine = engine_with_plan(tiny, "off")
    plan = baseline_plan("streaming", engine.model_config, BS, sink=4, recent=12)
    wrong_hash = tmp_path / "hash.json"
    type(plan)(**{**plan.__dict__, "config_hash": "0123456789abcdef"}).save(wrong_hash)
    with pytest.raises(ValueError, match="config hash 0123456789abcdef"):
        engine_with_plan(tiny, wrong_hash)
    with pytest.raises(ValueError, match="aligned to block_size=16; run with --block_size 16"):
        engine_with_plan(tiny, plan.save(tmp_path / "p.json"), block_size=32)
    shape = tmp_path / "shape.json"
    type(plan)(**{**plan.__dict__, "num_layers": 3, "levels": plan.levels + [["full", "full"]]}).save(shape)
    with pytest.raises(ValueError, match="3 layers x 2 KV heads"):
        engine_with_plan(tiny, shape)
    assert engine_with_plan(tiny, tmp_path / "p.json").layout == plan.to_layout()


def test_run_pa_runs_the_plan_it_is_given(tiny, tmp_path, capsys):
    """A streaming plan (every group a 4 + 12 window) on a 120-token answer: run_pa's engine holds
    the windows (the KV report, computed from the engine's own layout and block counts) and the
    answer differs from the full cache's."""
    engine = engine_with_plan(tiny, "off")
    plan_path = baseline_plan("streaming", engine.model_config, BS, sink=4, recent=11).save(tmp_path / PLAN_NAME)
    common = ["--model_path", str(tiny), "--input_texts", "hello world the quick brown fox", "--ignore_eos"]
    common += ["--max_output_length", "120", "--block_size", str(BS), "--max_input_length", "64"]
    (windowed,) = run_pa.main(common + ["--mlgc", str(plan_path)])
    report = capsys.readouterr().out
    (full,) = run_pa.main(common + ["--mlgc", "off"])
    assert "window: 4 groups, peak 4 blocks" in report  # 4 + 11 + 1 slots: one block per group
    share = int(re.search(r"uncompressed \((\d+)%\)", report).group(1))
    assert share < 15  # 4 blocks against 4 x 8 for ~127 tokens
    assert windowed.token_ids != full.token_ids


@pytest.mark.parametrize("seed", range(8))
def test_a_kv_budget_keeps_the_most_groups_whole_and_windows_the_least_scored(seed):
    """retrieval_costs spent by the knapsack: as many whole-history groups as the bytes hold (int8
    where they must be), the windows on the groups of least score, full precision on the highest."""
    from atb_llm.compression.budget import retrieval_costs, spend

    rng = random.Random(seed)
    groups, share = 12, rng.uniform(0.06, 0.9)
    scores = [rng.random() for _ in range(groups)]
    full, window = Level(), Window(sink=4, recent=27)
    levels = [full, full.as_int8(), window, window.as_int8()]
    chosen, record = spend(retrieval_costs(scores, levels), share, 256, 16, torch.float32, BS)
    size = {lv: lv.blocks(256, BS) * lv.storage.bytes_per_block(BS, 16, torch.float32) for lv in levels}
    assert record["kv_bytes"] == sum(size[lv] for lv in chosen) <= record["budget_bytes"] == int(share * 12 * 32768)
    whole = [g for g, lv in enumerate(chosen) if lv.comp_slot is None]
    most = max(
        k for k in range(groups + 1) if k * size[levels[1]] + (groups - k) * size[levels[3]] <= share * 12 * 32768
    )
    assert len(whole) == most
    windowed = [g for g in range(groups) if g not in whole]
    assert all(scores[w] < scores[g] for w in windowed for g in whole)
    fp = [g for g in whole if not chosen[g].int8]
    assert all(scores[f] > scores[g] for f in fp for g in whole if chosen[g].int8)


def test_calibrate_spends_a_kv_budget_over_every_level(tiny, tmp_path, capsys):
    model = shutil.copytree(tiny, tmp_path / "m")
    argv = ["-m", str(model), "--kv_budget", "0.25", "--int8", "--reference_tokens", "512", "--sink", "4",
            "--recent", "20", "--block_size", "16", "--samples", "2", "--period", "24"]  # fmt: skip
    plan = MlgcPlan.load(calibrate_cli.main(argv))
    assert plan.method == "razor" and plan.full_ratio is None
    rec = plan.calibration
    assert rec["kv_bytes"] <= rec["budget_bytes"] == int(0.25 * 4 * 32 * 2048) and rec["dtype"] == "float32"
    assert rec["budget"] == 0.25 and rec["reference_tokens"] == 512 and rec["period"] == 24
    # at 512 tokens (head_dim 16, fp32) full_int8 is 32 blocks of 512 + 128 bytes (31.25% of full), a
    # window 2 blocks of 2048 (6.25%): three full_int8 and one float window fill the quarter exactly
    assert plan.counts() == {"full_int8": 3, "window": 1}
    echo, induction = sum(plan.scores["echo"], []), sum(plan.scores["induction"], [])
    scores = [max(e / max(echo), i / max(induction)) for e, i in zip(echo, induction)]
    assert sum(plan.levels, []).index("window") == min(range(4), key=lambda g: scores[g])
    assert "levels: {'full_int8': 3, 'window': 1}" in capsys.readouterr().out


def test_calibrate_spends_a_quarter_of_the_bytes_over_every_level_by_default(tiny, tmp_path):
    model = shutil.copytree(tiny, tmp_path / "m")
    argv = ["-m", str(model), "--reference_tokens", "512", "--sink", "4", "--recent", "20", "--block_size", "16",
            "--samples", "2", "--period", "24"]  # fmt: skip
    plan = MlgcPlan.load(calibrate_cli.main(argv))
    assert plan.calibration["budget"] == 0.25 and plan.counts() == {"full_int8": 3, "window": 1}  # as --kv_budget 0.25
    floats = MlgcPlan.load(calibrate_cli.main([*argv, "--float_levels"]))
    assert set(floats.counts()) <= {"full", "window"} and floats.calibration["kv_bytes"] <= 0.25 * 4 * 32 * 2048
    with pytest.raises(ValueError, match="give --full_ratio .* or --kv_budget .*, not both"):
        calibrate_cli.main([*argv, "--full_ratio", "0.5", "--kv_budget", "0.3"])
