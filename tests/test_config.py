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


def test_rope_scaling_is_refused(tmp_path):
    raw = qwen7b()
    raw["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        load_qwen2_config(write(tmp_path, raw))


def test_config_hash_tells_models_apart(tmp_path):
    a = load_qwen2_config(write(tmp_path, qwen7b()))
    raw = qwen7b()
    raw["num_hidden_layers"] = 24
    other = tmp_path / "b"
    other.mkdir()
    assert load_qwen2_config(write(other, raw)).config_hash() != a.config_hash()
