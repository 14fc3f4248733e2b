"""With compression off, greedy output equals Hugging Face transformers token for token."""

import json
import random

import pytest
from tiny import hf_greedy

from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams

PROMPTS = [
    "Write a python function that checks if a number is prime.",
    "def fib(n):",
    "Hello",
    "The capital of France is",
    "Explain quicksort in detail, step by step, with an example list of ten numbers and show each partition.",
    "import numpy as np\n",
    "1, 2, 3, 4,",
    "Translate to French: I like cheese.",
]


@pytest.fixture(scope="module")
def default_fp32(default_model):
    engine = LLMEngine(
        EngineConfig(
            str(default_model), dtype="fp32", max_batch_size=8, max_output_length=32, block_size=16, progress=False
        )
    )
    ids = [engine.encode(p, chat=i % 2 == 0) for i, p in enumerate(PROMPTS)]
    return engine, ids, hf_greedy(default_model, ids, 24)


def test_default_model_one_at_a_time(default_fp32):
    engine, ids, ref = default_fp32
    for prompt, want in zip(ids, ref):
        (out,) = engine.generate([prompt], SamplingParams(max_tokens=24))
        assert out.token_ids == want


def test_default_model_batched(default_fp32):
    engine, ids, ref = default_fp32
    assert len({len(i) for i in ids}) >= 6  # different lengths in one batch
    outs = engine.generate(ids, SamplingParams(max_tokens=24))
    assert [o.token_ids for o in outs] == ref


@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("tie", [False, True])
def test_tiny_models_across_block_boundaries(tiny_models, block_size, tie):
    path = tiny_models(tie=tie)
    lengths = [1, 15, 16, 17, 33] if block_size == 16 else [100, 127, 128, 129, 250]
    rng = random.Random(block_size + tie)
    prompts = [[rng.randrange(2, 320) for _ in range(n)] for n in lengths]
    new = 20 if block_size == 16 else 12
    ref = hf_greedy(path, prompts, new)
    engine = LLMEngine(
        EngineConfig(
            str(path),
            max_batch_size=4,
            block_size=block_size,
            max_input_length=256,
            max_output_length=32,
            progress=False,
        )
    )
    batched = engine.generate(prompts, SamplingParams(max_tokens=new))  # 5 prompts, batch of 4: continuous batching
    assert [o.token_ids for o in batched] == ref
    assert max(len(r) for r in ref) == new  # the comparison covered whole generations


def with_yarn(src, dst, original: int, factor: float = 4.0):
    """The model folder (its files linked, not copied) with Qwen2.5's YaRN block in config.json (4.x form)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f.resolve())
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_yarn_tiny_model_past_its_original_length(tiny_models, tmp_path):
    """original_max_position_embeddings = 32 and factor 4: prompts of 40-90 tokens run where YaRN's
    interpolation and attention temperature change every logit, and greedy output equals transformers'."""
    path = with_yarn(tiny_models(), tmp_path / "yarn", original=32)
    rng = random.Random(7)
    prompts = [[rng.randrange(2, 320) for _ in range(n)] for n in (40, 64, 90)]
    ref = hf_greedy(path, prompts, 20)
    engine = LLMEngine(
        EngineConfig(str(path), dtype="fp32", block_size=16, max_input_length=100, max_output_length=24, progress=False)
    )
    assert engine.model_config.max_position_embeddings == 4096  # max(4096, 32 x 4)
    outs = engine.generate(prompts, SamplingParams(max_tokens=20))
    assert [o.token_ids for o in outs] == ref
    plain = LLMEngine(
        EngineConfig(str(tiny_models()), dtype="fp32", block_size=16, max_input_length=100, max_output_length=24,
                     progress=False)
    )  # fmt: skip
    assert [o.token_ids for o in plain.generate(prompts, SamplingParams(max_tokens=20))] != ref  # YaRN mattered


def test_yarn_default_model_short_prompt(default_model, tmp_path):
    path = with_yarn(default_model, tmp_path / "yarn", original=32768)
    engine = LLMEngine(EngineConfig(str(path), dtype="fp32", block_size=16, max_output_length=24, progress=False))
    ids = [engine.encode(p, chat=True) for p in PROMPTS[:2]]
    outs = engine.generate(ids, SamplingParams(max_tokens=16))
    assert [o.token_ids for o in outs] == hf_greedy(path, ids, 16)
    assert engine.model_config.max_position_embeddings == 131072
