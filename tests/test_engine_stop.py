"""A stop string ends generation at the token that completes it (finish_reason "stop"); the text is
cut before it."""

import json
import shutil
import time

import pytest

from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams

BS = 16


def test_stop_string_ends_generation(tiny_models):
    engine = LLMEngine(
        EngineConfig(str(tiny_models()), block_size=16, max_input_length=64, max_output_length=32, progress=False)
    )
    free = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=32, ignore_eos=True))[0]
    decoded = [engine.tokenizer.decode(free.token_ids[:n]) for n in range(len(free.token_ids) + 1)]
    start = next(i for i in range(len(decoded[8]), len(free.text) - 2) if free.text[i : i + 2].isprintable())
    stop = free.text[start : start + 2]
    completes_at = next(n for n, text in enumerate(decoded) if stop in text)
    out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=32, ignore_eos=True, stop=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[:completes_at] and completes_at < 32
    assert out.text == free.text[: free.text.index(stop)]


def small_engine(path) -> LLMEngine:
    return LLMEngine(EngineConfig(str(path), block_size=BS, max_input_length=64, max_output_length=8, progress=False))


# ---- eos and chat template -----------------------------------------------------------------------
def test_chat_prompts_go_through_the_models_chat_template(tiny, tmp_path):
    model = shutil.copytree(tiny, tmp_path / "chat")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    engine = small_engine(model)
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
    engine = small_engine(model)
    assert engine.eos_token_ids == {0, 3, engine.tokenizer.eos_token_id} and not engine.quant.gpu_gemms
    cfg = EngineConfig(str(model), block_size=BS, max_input_length=64, attention_backend="triton", progress=False)
    assert LLMEngine(cfg).quant.gpu_gemms


# ---- finish reasons -----------------------------------------------------------------------------
def test_a_stop_string_completed_on_the_last_allowed_token_is_stop(tiny):
    engine = small_engine(tiny)
    ids = engine.tokenizer.encode(" the quick brown fox", add_special_tokens=False)
    (out,) = engine.generate([[5, 6]], SamplingParams(force_tokens=ids, stop=("fox",)))
    assert len(out.token_ids) == len(ids)  # max_tokens = the forced tokens
    assert (out.finish_reason, out.text) == ("stop", " the quick brown ")
    (out,) = engine.generate([[5, 6]], SamplingParams(force_tokens=ids, stop=("cat",)))
    assert out.finish_reason == "length"


def test_the_text_leaves_out_a_final_stop_token_and_special_tokens(tiny, capsys):
    engine = small_engine(tiny)
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
    engine = small_engine(tiny)
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
