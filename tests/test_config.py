"""config.json in the transformers 4.x form (as Qwen2.5 ships) and the 5.x form."""

import json
import shutil
from pathlib import Path

import pytest

from atb_llm.models.qwen2_mlgc.config_qwen2_mlgc import load_qwen2_config

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "models" / "qwen2_5_mlgc" / "configs"


def write(tmp_path, cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def qwen7b():
    return json.loads((CONFIGS / "qwen2.5-7b-instruct.json").read_text())


def test_transformers_4_form(tmp_path):
    cfg = load_qwen2_config(write(tmp_path, qwen7b()))
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim) == (28, 4, 128)
    assert cfg.num_groups == 112 and cfg.queries_per_group == 7
    assert cfg.rope_theta == 1e6 and cfg.dtype == "bfloat16" and not cfg.tie_word_embeddings


def test_transformers_5_form(tmp_path):
    raw = qwen7b()
    raw["rope_parameters"] = {"rope_theta": raw.pop("rope_theta"), "rope_type": "default"}
    raw["dtype"] = raw.pop("torch_dtype")
    cfg5 = load_qwen2_config(write(tmp_path, raw))
    other = tmp_path / "four"
    other.mkdir()
    cfg4 = load_qwen2_config(write(other, qwen7b()))
    assert cfg5 == cfg4 and cfg5.config_hash() == cfg4.config_hash()


@pytest.mark.parametrize(
    "name, groups",
    [
        ("qwen2.5-0.5b-instruct", 48),
        ("qwen2.5-1.5b-instruct", 56),
        ("qwen2.5-14b-instruct", 384),
        ("qwen2.5-72b-instruct", 640),
    ],
)
def test_shared_configs(tmp_path, name, groups):
    shutil.copy(CONFIGS / f"{name}.json", tmp_path / "config.json")
    assert load_qwen2_config(tmp_path).num_groups == groups


YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}  # Qwen2.5's model cards


def test_yarn_in_both_config_forms(tmp_path):
    raw = qwen7b()
    raw["rope_scaling"] = YARN
    four = load_qwen2_config(write(tmp_path, raw))
    assert four.rope_scaling.rope_type == "yarn" and four.rope_scaling.factor == 4.0
    assert four.rope_scaling.original_max_position_embeddings == 32768
    assert four.max_position_embeddings == 131072  # the scaled length
    raw = qwen7b()
    raw["rope_parameters"] = {
        "rope_theta": raw.pop("rope_theta"),
        "rope_type": "yarn",
        **{k: v for k, v in YARN.items() if k != "type"},
    }
    other = tmp_path / "five"
    other.mkdir()
    assert load_qwen2_config(write(other, raw)) == four
    plain = tmp_path / "plain"
    plain.mkdir()
    assert four.config_hash() != load_qwen2_config(write(plain, qwen7b())).config_hash()  # plans know the RoPE


@pytest.mark.parametrize("kind", ["linear", "dynamic", "llama3", "longrope"])
def test_other_rope_types_name_the_supported_ones(tmp_path, kind):
    raw = qwen7b()
    raw["rope_scaling"] = {
        "rope_type": kind,
        "factor": 2.0,
        "original_max_position_embeddings": 8192,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "short_factor": [1.0] * 64,
        "long_factor": [1.0] * 64,
    }
    with pytest.raises(ValueError, match=f"rope_type='{kind}' is not supported; supported: default, yarn"):
        load_qwen2_config(write(tmp_path, raw))


def test_config_hash_tells_models_apart(tmp_path):
    a = load_qwen2_config(write(tmp_path, qwen7b()))
    raw = qwen7b()
    raw["num_hidden_layers"] = 24
    other = tmp_path / "b"
    other.mkdir()
    assert load_qwen2_config(write(other, raw)).config_hash() != a.config_hash()
