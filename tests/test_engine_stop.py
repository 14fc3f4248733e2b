"""A stop string ends generation at the token that completes it (finish_reason "stop"); the text is
cut before it."""

from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams


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
