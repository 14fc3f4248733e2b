"""Behaviour a user notices, pinned exactly: which sequence preemption picks and where it requeues,
in which order temperature and top-p apply, that a plan for another model or block size is refused
on the path run_pa and the server load it through, which finish reason wins when a stop string
completes on the last allowed token, that `run_pa --mlgc PLAN` really runs the plan, and the
per-level block accounting."""

import json
import re
import shutil
import time

import pytest
import torch

from atb_llm.cache.block_manager import BlockManager
from atb_llm.cache.kv_cache import KVPool
from atb_llm.compression.layout import GroupLayout
from atb_llm.compression.levels import INT8_STORAGE, MODEL_STORAGE, FullInt8, Level, Window, WindowInt8
from atb_llm.compression.plan import PLAN_NAME, baseline_plan
from atb_llm.entrypoints import run_pa
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sampler import Sampler
from atb_llm.runtime.scheduler import Scheduler
from atb_llm.runtime.sequence import SamplingParams, Sequence, SequenceStatus

BS = 16


# ---- preemption ---------------------------------------------------------------------------------
def full_pool_scheduler(num_blocks: int) -> Scheduler:
    """One group, `num_blocks` blocks of 16 tokens: a 16-token prompt takes one block, its 17th token a second."""
    return Scheduler(BlockManager(GroupLayout.uniform(1, 1), {"model": num_blocks}, BS), 8, 8192)


def run_prefill(sched: Scheduler, seqs: list[Sequence]) -> None:
    for s in seqs:
        sched.add(s)
    scheduled, is_prefill = sched.schedule()
    assert is_prefill and scheduled == seqs
    for s in seqs:
        s.num_computed_tokens = 16  # as the engine records the prefill
        s.output_token_ids.append(7)  # the prefill's token: each now needs a block for token 17


def test_preemption_takes_the_newest_and_requeues_it_ahead_of_later_arrivals():
    sched = full_pool_scheduler(3)
    a, b, c = (Sequence([1] * 16, SamplingParams(), request_id=x) for x in "abc")
    run_prefill(sched, [a, b, c])  # the pool is full
    d = Sequence([1] * 16, SamplingParams(), request_id="d")
    sched.add(d)  # arrives after a, b, c
    scheduled, is_prefill = sched.schedule()
    # a (oldest) grows into c's freed block; b cannot grow and no one newer is left: b goes too
    assert (scheduled, is_prefill) == ([a], False)
    assert [s.num_preemptions for s in (a, b, c, d)] == [0, 1, 1, 0] and sched.num_preemptions == 2
    assert [s.request_id for s in sched.waiting] == ["b", "c", "d"]  # preempted ones first, in arrival order
    assert b.status is c.status is SequenceStatus.WAITING and not any(b.block_table.rows)
    assert sched.block_manager.num_free() == {"model": 1}


def test_a_lone_sequence_that_cannot_grow_preempts_itself():
    sched = full_pool_scheduler(1)
    (a,) = seqs = [Sequence([1] * 16, SamplingParams(), request_id="a")]
    run_prefill(sched, seqs)
    assert sched.schedule() == ([], False)
    assert a.num_preemptions == 1 and list(sched.waiting) == [a]


# ---- admission ----------------------------------------------------------------------------------
def admitted(max_batch: int, budget: int, lengths: list[int]) -> list[int]:
    """Prompt tokens scheduled in the first step for prompts of `lengths`, queued in that order."""
    sched = Scheduler(BlockManager(GroupLayout.uniform(1, 1), {"model": 64}, BS), max_batch, budget)
    for n in lengths:
        sched.add(Sequence(list(range(2, 2 + n)), SamplingParams()))
    scheduled, is_prefill = sched.schedule()
    assert is_prefill and len(sched.running) == len(scheduled)
    return [s.num_scheduled_tokens for s in scheduled]


def test_admission_stops_at_the_batch_size_and_the_prefill_budget():
    assert admitted(2, 1000, [5, 5, 5]) == [5, 5]  # the batch is full
    assert admitted(3, 32, [16, 16, 16]) == [16, 16]  # an exact fit is admitted, then the budget is spent
    assert admitted(3, 32, [16, 17, 1]) == [16]  # in order: the one that does not fit stops the others
    assert admitted(3, 8, [20, 5]) == [20]  # the first prompt goes in whatever its length


def test_admission_counts_the_blocks_a_cached_prefix_saves():
    """A 6-block pool: a holds 4 blocks; b shares a's first 3 and needs 2 of its own, which fit."""
    sched = Scheduler(BlockManager(GroupLayout.uniform(1, 1), {"model": 6}, BS, prefix_caching=True), 8, 8192)
    a = Sequence(list(range(2, 66)), SamplingParams())
    sched.add(a)
    assert sched.schedule() == ([a], True)
    a.num_computed_tokens = 64
    sched.block_manager.cache(a.block_table, a.token_ids, 64)  # as the engine records a finished prefill
    b = Sequence(list(range(2, 50)) + [1] * 20, SamplingParams())
    sched.add(b)
    assert sched.schedule() == ([b], True)
    assert (b.num_computed_tokens, b.num_scheduled_tokens) == (48, 20)
    assert b.block_table[0][:3] == a.block_table[0][:3] and sched.block_manager.num_free() == {"model": 0}


def test_siblings_of_a_one_token_prompt_start_together_with_nothing_to_share():
    sched = full_pool_scheduler(8)
    a, b = Sequence([5], SamplingParams()), Sequence([5], SamplingParams())
    sched.add(a)
    sched.add(b, sibling_of=a)
    assert sched.schedule() == ([a, b], True) and a.fork_at == 0 and not sched.siblings


def test_preempted_sequences_come_back_with_their_tokens(tiny_models):
    """Exact preemption counts on a real engine: three 16-token prompts in a 4-group, 12-block pool."""
    engine = LLMEngine(
        EngineConfig(str(tiny_models()), block_size=BS, max_input_length=64, max_output_length=8, num_blocks=12,
                     max_batch_size=3, progress=False),
    )  # fmt: skip
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    alone = [engine.generate([[i + 2] * 16], params)[0].token_ids for i in range(3)]
    outs = engine.generate([[i + 2] * 16 for i in range(3)], params)
    assert [o.token_ids for o in outs] == alone
    assert [o.num_preemptions for o in outs] == [0, 1, 1]  # the newest two step aside once each


# ---- sampling order -------------------------------------------------------------------------------
def sample_many(temperature: float, top_p: float, n: int = 300) -> set[int]:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    seen = set()
    for seed in range(n):
        seq = Sequence([1], SamplingParams(temperature=temperature, top_p=top_p, seed=seed))
        seen.add(Sampler()(logits, [seq])[0])
    return seen


def test_temperature_applies_before_top_p():
    """At temperature 0.5 token 0 has p = e^4 / (e^4 + e^2 + 1 + e^-2) = 0.865 >= 0.8: the nucleus is
    token 0 alone. Filtered first at temperature 1 (p0 = 0.644) the nucleus would also hold token 1."""
    assert sample_many(0.5, 0.8) == {0}
    assert sample_many(0.5, 0.9) == {0, 1}  # 0.865 < 0.9: token 1 joins, so the test above can fail


# ---- plans -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models()


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


def test_chat_prompts_go_through_the_models_chat_template(tiny, tmp_path):
    model = shutil.copytree(tiny, tmp_path / "chat")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    engine = engine_with_plan(model, "off")
    ids = engine.encode("hello world", chat=True)
    assert isinstance(ids, list) and all(isinstance(t, int) for t in ids)
    want = "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    assert engine.tokenizer.decode(ids) == want
    assert engine.encode("hello world") == engine.tokenizer.encode("hello world", add_special_tokens=False)


def test_eos_is_the_models_and_the_tokenizers(tiny, tmp_path):
    """Instruct checkpoints name several end tokens (config / generation config) besides the
    tokenizer's: the engine stops at any of them. (And the triton backend runs the quantized linears
    in its kernels.)"""
    model = shutil.copytree(tiny, tmp_path / "eos")
    config = json.loads((model / "config.json").read_text())
    config["eos_token_id"] = [0, 3]
    (model / "config.json").write_text(json.dumps(config))
    (model / "generation_config.json").unlink(missing_ok=True)
    engine = engine_with_plan(model, "off")
    assert engine.eos_token_ids == {0, 3, engine.tokenizer.eos_token_id} and not engine.quant.gpu_gemms
    cfg = EngineConfig(str(model), block_size=BS, max_input_length=64, attention_backend="triton", progress=False)
    assert LLMEngine(cfg).quant.gpu_gemms


# ---- finish reasons -----------------------------------------------------------------------------
def test_a_stop_string_completed_on_the_last_allowed_token_is_stop(tiny):
    engine = engine_with_plan(tiny, "off")
    ids = engine.tokenizer.encode(" the quick brown fox", add_special_tokens=False)
    (out,) = engine.generate([[5, 6]], SamplingParams(force_tokens=ids, stop=("fox",)))
    assert len(out.token_ids) == len(ids)  # max_tokens = the forced tokens
    assert (out.finish_reason, out.text) == ("stop", " the quick brown ")
    (out,) = engine.generate([[5, 6]], SamplingParams(force_tokens=ids, stop=("cat",)))
    assert out.finish_reason == "length"


def test_the_text_leaves_out_a_final_stop_token_and_special_tokens(tiny, capsys):
    engine = engine_with_plan(tiny, "off")
    ids = engine.tokenizer.encode(" the quick brown fox", add_special_tokens=False)
    eos = engine.tokenizer.eos_token_id
    (out,) = engine.generate([[5, 6]], SamplingParams(force_tokens=(*ids, eos, ids[0]), stop_token_ids=(eos,)))
    assert (out.finish_reason, out.token_ids, out.text) == ("stop", [*ids, eos], " the quick brown fox")
    (out,) = engine.generate([[5, 6]], SamplingParams(force_tokens=ids, stop_token_ids=(ids[2],)))
    assert (out.finish_reason, out.token_ids) == ("stop", ids[:3])
    assert out.text == engine.tokenizer.decode(ids[:2])
    forced = (ids[0], eos, ids[1])  # an eos inside the output (ignore_eos) makes no text
    outs = engine.generate([[5, 6], [7]], SamplingParams(force_tokens=forced, ignore_eos=True), use_tqdm=True)
    assert [(o.finish_reason, o.text) for o in outs] == [("length", engine.tokenizer.decode([ids[0], ids[1]]))] * 2
    err = capsys.readouterr().err
    assert "Generating: 100%" in err and "| 2/2 [" in err
    # stop strings are searched in that same text: across the eos, not in its spelling
    stop = engine.tokenizer.decode([ids[0], ids[1]])
    (out,) = engine.generate([[5, 6]], SamplingParams(force_tokens=forced, ignore_eos=True, stop=(stop,)))
    assert (out.finish_reason, out.text) == ("stop", "")


def test_time_to_first_token_is_the_first_steps_and_per_token_time_the_rest(tiny):
    engine = engine_with_plan(tiny, "off")
    seq = engine.add_request([5, 6, 7], SamplingParams(max_tokens=5, ignore_eos=True))
    steps = [time.perf_counter()]
    while engine.has_unfinished():
        engine.step()
        steps.append(time.perf_counter())
    out = engine.output(seq)
    assert len(steps) == 6 and steps[0] <= seq.first_token_time <= steps[1]  # stamped in the first step
    assert out.ttft_s == pytest.approx(seq.first_token_time - seq.arrival_time) and out.ttft_s > 0
    assert steps[4] <= seq.finish_time <= steps[5]
    assert out.tpot_s == pytest.approx((seq.finish_time - seq.first_token_time) / 4) and out.tpot_s > 0


def test_decode_steps_leave_the_prefix_cache_alone_until_the_sequence_ends(tiny):
    """The prompt's full blocks are cached once its prefill ends; blocks filled by decode are
    recorded when the sequence frees them, not hashed again at every step."""
    cfg = EngineConfig(str(tiny), block_size=BS, max_input_length=64, max_output_length=40, prefix_caching=True,
                       progress=False)  # fmt: skip
    engine = LLMEngine(cfg)
    prefix = engine.cache_manager.block_manager.prefix
    engine.add_request(list(range(3, 23)), SamplingParams(max_tokens=30, ignore_eos=True))  # 20 tokens: 1 block
    engine.step()
    assert len(prefix.entries) == 1
    for _ in range(20):  # 40 tokens now: two full blocks
        engine.step()
    assert len(prefix.entries) == 1
    while engine.has_unfinished():
        engine.step()
    assert len(prefix.entries) == 49 // BS  # the last token is never computed


# ---- block accounting per level ------------------------------------------------------------------
def test_blocks_needed_per_level_come_from_the_block_manager():
    window = Window(sink=4, recent=27)  # 4 + 27 + 1 = 32 slots: a ring of 2 blocks
    bm = BlockManager(GroupLayout(2, 2, (Level(), window, window, window)), {"model": 100}, BS)
    got = [bm.blocks_needed(n)["model"] for n in (3, 10, 16, 17, 40, 100)]
    assert got == [4, 4, 7, 8, 9, 13]  # 1 full group (ceil(n/16)) + 3 rings (at most 2 blocks each)


def test_per_level_block_counts_return_to_zero(tiny):
    levels = (Level(), Window(sink=4, recent=11), FullInt8(), WindowInt8(sink=4, recent=11))
    engine = LLMEngine(
        EngineConfig(str(tiny), block_size=BS, max_input_length=64, max_output_length=40, progress=False),
        layout=GroupLayout(2, 2, levels),
    )
    engine.generate([[i + 2] * (10 + 7 * i) for i in range(5)], SamplingParams(max_tokens=40, ignore_eos=True))
    usage = engine.cache_manager.usage_by_level()
    assert all(set(u) == {"groups", "blocks_used", "blocks_peak", "bytes_used", "bytes_peak"} for u in usage.values())
    assert {name: u["blocks_used"] for name, u in usage.items()} == dict.fromkeys(usage, 0)
    # peaks: 5 sequences of up to 78 tokens; a full group holds ceil(n / 16) blocks, a window ring one
    assert usage["window"]["blocks_peak"] == usage["window_int8"]["blocks_peak"] == 5
    assert (
        usage["full"]["blocks_peak"]
        == usage["full_int8"]["blocks_peak"]
        == sum(-(-(10 + 7 * i + 39) // BS) for i in range(5))
    )
    assert engine.cache_manager.block_manager.num_free() == {
        p: engine.cache_manager.num_blocks[p] for p in ("model", "int8")
    }


# ---- int8 storage against a reference written here -------------------------------------------------
def test_int8_storage_round_trip_equals_an_fp32_reference():
    torch.manual_seed(0)
    x = torch.randn(64, 128) * torch.logspace(-3, 2, 64)[:, None]  # rows over five decades
    x[3] = 0  # an all-zero token
    q, scale = WindowInt8.storage.quantize(x)
    ref_scale = x.abs().amax(-1) / 127
    ref_q = torch.where(ref_scale[:, None] > 0, torch.round(x / ref_scale[:, None].clamp(min=1e-30)), 0)
    assert q.dtype == torch.int8 and torch.equal(q.float(), ref_q)
    assert torch.allclose(scale[ref_scale > 0], ref_scale[ref_scale > 0])
    back = WindowInt8.storage.dequantize(q, scale, torch.float32)
    assert torch.all((back - x).abs() <= ref_scale[:, None] / 2 + 1e-6)  # half a step per token
    assert torch.equal(back[3], torch.zeros(128))


def test_a_layout_of_another_shape_is_refused(tiny):
    cfg = EngineConfig(str(tiny), block_size=BS, max_input_length=64, max_output_length=8, progress=False)
    with pytest.raises(ValueError, match=r"1 layers x 2 KV heads, the model 2 x 2; build it with GroupLayout"):
        LLMEngine(cfg, layout=GroupLayout.uniform(1, 2))


@pytest.mark.parametrize("int8", [False, True])
def test_a_pool_reads_back_what_it_wrote_in_the_asked_dtype(int8):
    pool = KVPool.allocate(4, 16, 32, torch.bfloat16, INT8_STORAGE if int8 else MODEL_STORAGE)
    torch.manual_seed(0)
    k, v, slots = torch.randn(5, 32), torch.randn(5, 32), torch.tensor([0, 17, 18, 40, 63])
    pool.write(slots, k, v)
    for dtype in (torch.float32, torch.bfloat16):
        rk, rv = pool.read(slots, dtype)
        assert rk.dtype == rv.dtype == dtype
        step = k.abs().amax(-1, keepdim=True) / 127 if int8 else k.abs() / 128  # int8 / bf16 rounding
        assert torch.all((rk.float() - k).abs() <= step) and not torch.equal(rk, rv)
