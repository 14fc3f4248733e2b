"""Bad input gets a clear error naming the problem and the fix."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from atb_llm.cache.cache_manager import CacheConfig
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams


def engine(path, **kw):
    return LLMEngine(
        EngineConfig(str(path), block_size=16, max_input_length=64, max_output_length=16, progress=False, **kw)
    )


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pass a Hugging Face model folder"):
        engine(tmp_path / "nope")


def test_missing_shard(tiny_models, tmp_path):
    path = copy_model(tiny_models(), tmp_path / "m")
    weights = load_file(path / "model.safetensors")
    names = sorted(weights)
    half = len(names) // 2
    save_file({k: weights[k] for k in names[:half]}, path / "model-00001-of-00002.safetensors")
    (path / "model.safetensors").unlink()
    index = {
        "weight_map": {
            k: "model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors"
            for i, k in enumerate(names)
        }
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"names shard\(s\) \['model-00002-of-00002.safetensors'\]"):
        engine(path)


def test_sharded_checkpoint_loads(tiny_models, tmp_path):
    path = copy_model(tiny_models(), tmp_path / "m")
    weights = load_file(path / "model.safetensors")
    names = sorted(weights)
    shards = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    for f in set(shards.values()):
        save_file({n: weights[n] for n in names if shards[n] == f}, path / f)
    (path / "model.safetensors").unlink()
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    sharded = engine(path).generate([[5, 6, 7]], SamplingParams(max_tokens=8, ignore_eos=True))
    single = engine(tiny_models()).generate([[5, 6, 7]], SamplingParams(max_tokens=8, ignore_eos=True))
    assert sharded[0].token_ids == single[0].token_ids


def test_not_qwen2(tiny_models, tmp_path):
    path = copy_model(tiny_models(), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type='llama'; supported model types: \\['qwen2'\\]"):
        engine(path)


def test_weight_of_the_wrong_shape(tiny_models, tmp_path):
    path = copy_model(tiny_models(), tmp_path / "m")
    weights = load_file(path / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"model.layers.1.mlp.up_proj.weight has shape \(100, 64\) but .* "
        r"expects \(128, 64\)",
    ):
        engine(path)


def test_missing_tensor(tiny_models, tmp_path):
    path = copy_model(tiny_models(), tmp_path / "m")
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.0.self_attn.k_proj.bias"]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ValueError, match="checkpoint lacks 1 tensor"):
        engine(path)


def test_prompt_longer_than_max_input_length(tiny_models):
    e = engine(tiny_models())
    with pytest.raises(
        ValueError,
        match="the prompt has 65 tokens, more than max_input_length=64; shorten it or raise --max_input_length$",
    ):
        e.add_request(list(range(2, 67)))
    assert not e.has_unfinished()


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(max_tokens=0), "max_tokens=0 must be at least 1"),
        (dict(temperature=-1), "temperature=-1 must be >= 0"),
        (dict(top_p=0), r"top_p=0 must be in \(0, 1\]"),
        (dict(top_k=-1), r"top_k=-1 must be >= 0"),
        (dict(presence_penalty=2.5), r"^presence_penalty=2.5 must be in \[-2, 2\]$"),
        (dict(frequency_penalty=-2.5), r"^frequency_penalty=-2.5 must be in \[-2, 2\]$"),
        (dict(repetition_penalty=0), r"repetition_penalty=0 must be in \[0.01, 100.0\]"),
        (dict(repetition_penalty=1e-300), r"repetition_penalty=1e-300 must be in \[0.01, 100.0\]"),
        (dict(repetition_penalty=100.5), r"repetition_penalty=100.5 must be in \[0.01, 100.0\]"),
        (dict(min_tokens=-1), r"min_tokens=-1 must be in \[0, max_tokens=64\]"),
        (dict(min_tokens=5, max_tokens=4), r"min_tokens=5 must be in \[0, max_tokens=4\]"),
        (dict(logprobs=21), r"^logprobs=21 must be in \[0, 20\] \(alternatives per token\)$"),
        (dict(prompt_logprobs=-1), r"^prompt_logprobs=-1 must be in \[0, 20\]"),
    ],
)
def test_bad_sampling_params(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw)


def test_sampling_params_at_their_limits_are_accepted():
    p = SamplingParams(
        max_tokens=1, min_tokens=0, logprobs=20, prompt_logprobs=0, frequency_penalty=2, presence_penalty=-2
    )
    assert (p.max_tokens, p.logprobs, p.prompt_logprobs) == (1, 20, 0)
    assert SamplingParams(max_tokens=3, min_tokens=3, top_k=0, top_p=1.0).min_tokens == 3


def test_bad_cache_settings_name_the_value():
    for kw, message in [
        ({"block_size": 24}, "block_size=24 must be a positive multiple of 16"),
        ({"block_size": 0}, "block_size=0 must be a positive multiple of 16"),
        ({"num_blocks": 0}, "^num_blocks=0 must be at least 1$"),
        ({"memory_gb": 0.0}, "^memory_gb=0.0 must be positive$"),
    ]:
        with pytest.raises(ValueError, match=message):
            CacheConfig(**kw)
    assert CacheConfig(block_size=16).block_size == 16 and CacheConfig(block_size=32, num_blocks=1).num_blocks == 1


def test_bad_requests_leave_the_engine_usable(tiny_models):
    e = engine(tiny_models())
    good = e.add_request([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True), request_id="x")
    for bad, message in [
        ([], "the prompt is empty"),
        ([5, 999], r"prompt has token id\(s\) outside the vocabulary \[0, 320\): 999;"),
        ([5], "max_tokens=17 exceeds max_output_length=16"),
    ]:
        with pytest.raises(ValueError, match=message):
            e.add_request(bad, SamplingParams(max_tokens=17 if len(bad) == 1 else 4))
    with pytest.raises(ValueError, match="request_id 'x' is already in use"):
        e.add_request([5], SamplingParams(max_tokens=4), request_id="x")
    while e.has_unfinished():
        e.step()
    assert len(good.output_token_ids) == 4


def test_block_size_must_be_a_multiple_of_16(tiny_models):
    with pytest.raises(ValueError, match="block_size=100 must be a positive multiple of 16"):
        LLMEngine(EngineConfig(str(tiny_models()), block_size=100, max_input_length=64, progress=False))


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(seed=2**64), r"seed=18446744073709551616 is outside \[0, 2\*\*64 - 1\]"),
        (dict(seed=-1), r"seed=-1 is outside"),
    ],
)
def test_seeds_outside_64_bits_are_refused_up_front(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw)
    SamplingParams(seed=2**64 - 1, temperature=0.7)  # the largest seed is fine


def test_tiny_temperature_samples_greedily(tiny_models):
    e = engine(tiny_models())
    greedy, tiny = e.generate(
        [[5, 6, 7]] * 2, [SamplingParams(max_tokens=6, ignore_eos=True, temperature=t) for t in (0, 1e-40)]
    )
    assert tiny.token_ids == greedy.token_ids and tiny.finish_reason == "length"


def test_a_failing_sequence_is_ended_alone(tiny_models, monkeypatch):
    """Sampling that fails for one sequence (non-finite logits) ends that sequence with "error"; the
    batch's other sequence goes on exactly as it would alone, and every block is freed."""
    e = engine(tiny_models())
    alone = e.generate([[5, 6, 7]], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    prepare, model, batch = e.runner.prepare, e.runner.model, []

    def remember(seqs, is_prefill):
        batch[:] = seqs
        return prepare(seqs, is_prefill)

    def poisoned(*args):  # the model's logits, NaN in the row of "bad" once it has 2 tokens
        logits = model(*args).clone()
        for i, s in enumerate(batch):
            if s.request_id == "bad" and len(s.output_token_ids) == 2:
                logits[i] = float("nan")
        return logits

    monkeypatch.setattr(e.runner, "prepare", remember)
    monkeypatch.setattr(e.runner, "model", poisoned)
    params = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.7, seed=1)
    bad = e.add_request([8, 9], params, request_id="bad")
    good = e.add_request([5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True), request_id="good")
    while e.has_unfinished():
        e.step()
    assert (bad.finish_reason, len(bad.output_token_ids)) == ("error", 2)
    assert "sampling failed" in bad.error
    assert good.output_token_ids == alone and good.finish_reason == "length"
    assert all(n == 0 for n in e.cache_manager.block_manager.num_used().values())


def test_folder_without_tokenizer_files(tiny_models, tmp_path):
    path = copy_model(tiny_models(), tmp_path / "m")
    for f in path.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens")):
            f.unlink()
    with pytest.raises(FileNotFoundError, match=f"{path} has no tokenizer files.*copy them"):
        engine(path)
