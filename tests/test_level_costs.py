"""Calibration by measured loss: the knapsack finds the cheapest levels within the byte budget (against
brute force), and on a tiny model with a planted long-range copying head the measured costs keep that
head's group whole while the plan meets the budget."""

import itertools
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from atb_llm.compression.budget import choose_levels
from atb_llm.compression.levels import FullInt8, Level, Window, WindowInt8
from atb_llm.compression.memory import level_bytes
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.level_costs import LossCalibrationConfig, loss_plan

LEVELS = [Level(), FullInt8(), Window(sink=4, recent=27), WindowInt8(sink=4, recent=27)]


def brute_force(costs, sizes, budget):
    best = None
    for combo in itertools.product(*[list(c) for c in costs]):
        nbytes = sum(sizes[lv] for lv in combo)
        if nbytes <= budget:
            key = (sum(c[lv] for c, lv in zip(costs, combo)), nbytes)
            best = min(best or (key, combo), (key, combo), key=lambda x: x[0])
    return best


@pytest.mark.parametrize("seed", range(20))
def test_choose_levels_is_the_cheapest_choice_within_the_budget(seed):
    rng = random.Random(seed)
    sizes = {lv: level_bytes(lv, 256, 16, torch.float32, 16) for lv in LEVELS}
    assert list(sizes.values()) == [32768, 10240, 4096, 1280]
    costs = [{lv: (0.0 if lv == Level() else rng.random() * (3 if lv.comp_slot else 0.2)) for lv in LEVELS}]
    costs += [{lv: rng.random() for lv in LEVELS} for _ in range(4)]
    budget = rng.randrange(5 * 1280, 5 * 32768)
    chosen = choose_levels(costs, sizes, budget)
    (cost, nbytes), _ = brute_force(costs, sizes, budget)
    assert sum(sizes[lv] for lv in chosen) <= budget
    assert sum(c[lv] for c, lv in zip(costs, chosen)) == pytest.approx(cost)


def test_a_budget_below_the_smallest_levels_is_refused():
    sizes = {LEVELS[0]: 32768, LEVELS[3]: 1280}
    with pytest.raises(ValueError, match="cannot hold even the smallest level of every group"):
        choose_levels([{LEVELS[0]: 0.0, LEVELS[3]: 1.0}] * 3, sizes, 3 * 1280 - 1)


MARKER = 77  # the token the planted head retrieves
HEAD_DIM, SLOW_DIM = 16, 7  # rotary pair (7, 15) turns 3e-4 rad a position: attention ignores distance


def plant_copying_head(folder):
    """Layer 0, KV head 0 (group 0) becomes a retrieval head: its query heads (0, 1) ask, from every
    position, for the marker token wherever it is, and copy its value (made 4x larger)."""
    path = folder / "model.safetensors"
    w = load_file(path)
    pre = "model.layers.0."
    x = w["model.embed_tokens.weight"][MARKER]
    x = x / x.pow(2).mean().add(1e-6).sqrt() * w[pre + "input_layernorm.weight"]  # the marker's normed input
    q_w, q_b = w[pre + "self_attn.q_proj.weight"], w[pre + "self_attn.q_proj.bias"]
    k_w, k_b = w[pre + "self_attn.k_proj.weight"], w[pre + "self_attn.k_proj.bias"]
    v_w, v_b = w[pre + "self_attn.v_proj.weight"], w[pre + "self_attn.v_proj.bias"]
    q_w[: 2 * HEAD_DIM] = 0
    q_b[: 2 * HEAD_DIM] = 0
    q_b[SLOW_DIM], q_b[HEAD_DIM + SLOW_DIM] = 20.0, 20.0  # heads 0 and 1: a constant query
    k_w[:HEAD_DIM], k_b[:HEAD_DIM] = 0, 0
    k_w[SLOW_DIM] = 4.0 * x / x.dot(x)  # k = 4 for the marker, about 0 for the rest
    v_w[:HEAD_DIM] *= 4
    v_b[:HEAD_DIM] *= 4
    save_file(w, path)
    return folder


def test_measured_costs_keep_a_planted_copying_head_whole(tiny_models, tmp_path):
    import shutil

    folder = plant_copying_head(shutil.copytree(tiny_models(), tmp_path / "planted"))
    rng = random.Random(0)
    prompts = []
    for _ in range(2):  # the marker far back, outside any window; the rest random tokens
        p = [rng.randrange(3, 300) for _ in range(192)]
        p = [t if t != MARKER else 5 for t in p]
        p[rng.randrange(40, 90)] = MARKER
        prompts.append(p)
    cfg = EngineConfig(str(folder), block_size=16, max_input_length=160, max_output_length=32, progress=False)
    engine = LLMEngine(cfg)
    lc = LossCalibrationConfig(budget=0.25, reference_tokens=256, sink=4, recent=20, block_size=16, context=160,
                               continuation=32)  # fmt: skip
    plan = loss_plan(engine, prompts, lc, progress=False)
    costs = {name: torch.tensor(v).flatten() for name, v in plan.scores.items()}
    assert int(costs["cost window"].argmax()) == 0  # the planted group loses most as a window
    assert costs["cost window"][0] > 5 * costs["cost window"][1:].max()
    levels = [name for row in plan.levels for name in row]
    assert levels[0] in ("full", "full_int8")  # it keeps its whole history
    assert plan.method == "loss" and plan.recent == 27  # aligned: 4 + 27 + 1 = two blocks of 16
    assert plan.calibration["kv_bytes"] <= plan.calibration["budget_bytes"] == 4 * 32768 // 4
    # the knapsack's choice is the cheapest within the budget
    objs = plan.level_objects()
    sizes = {lv: level_bytes(lv, 256, HEAD_DIM, torch.float32, 16) for lv in set(objs)}
    assert sum(sizes[lv] for lv in objs) == plan.calibration["kv_bytes"]


def test_calibrate_command_makes_a_loss_plan(tiny_models, tmp_path, capsys):
    import shutil

    from atb_llm.compression.plan import PLAN_NAME, MlgcPlan
    from atb_llm.entrypoints import calibrate as calibrate_cli

    model = shutil.copytree(tiny_models(), tmp_path / "m")
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    argv = ["-m", str(model), "--method", "loss", "--kv_budget", "0.3", "--reference_tokens", "512",
            "--calib_text", str(text), "--samples", "2", "--context", "96", "--continuation", "8",
            "--sink", "4", "--recent", "20", "--block_size", "16", "--int8"]  # fmt: skip
    out = calibrate_cli.main(argv)
    plan = MlgcPlan.load(out)
    assert out == model / PLAN_NAME and plan.method == "loss"
    assert plan.calibration["kv_bytes"] <= plan.calibration["budget_bytes"] == int(0.3 * 4 * 32 * 2048)
    assert set(plan.scores) == {"cost full", "cost full_int8", "cost window", "cost window_int8"}
    assert "plan written to" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"prompt\(s\) of 104 tokens, --samples asks 999; give a longer text"):
        calibrate_cli.main([*argv, "--samples", "999"])
