"""Qwen2 / Qwen2.5 configuration: config.json in the transformers 4.x or 5.x form."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from atb_llm.config import ModelConfig, RopeScaling, read_config_json


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def load_qwen2_config(weight_dir: str | Path) -> ModelConfig:
    """Read a Qwen2 config through transformers (which accepts both `rope_theta`/`torch_dtype`
    and `rope_parameters`/`dtype`) and check that the engine supports it."""
    raw = read_config_json(weight_dir)
    if raw.get("model_type") != "qwen2":
        raise ValueError(
            f"config.json in {weight_dir} has model_type={raw.get('model_type')!r}; this engine runs "
            "qwen2 models (Qwen2, Qwen2.5, Qwen2.5-Coder)"
        )
    from transformers import AutoConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoConfig.from_pretrained(str(weight_dir))
    rope = dict(getattr(hf, "rope_parameters", None) or {"rope_theta": getattr(hf, "rope_theta", 10000.0)})
    scaling = rope_scaling(rope, hf.max_position_embeddings)
    max_positions = hf.max_position_embeddings
    if scaling is not None:  # the scaled length, as vLLM takes it
        max_positions = max(max_positions, int(scaling.original_max_position_embeddings * scaling.factor))
    if getattr(hf, "use_sliding_window", False):
        raise ValueError("use_sliding_window=true is not supported; Qwen2.5 checkpoints ship it as false")
    if hf.num_attention_heads % hf.num_key_value_heads:
        raise ValueError(
            f"num_attention_heads={hf.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={hf.num_key_value_heads}"
        )
    dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None) or torch.bfloat16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return ModelConfig(
        model_type="qwen2",
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=hf.num_key_value_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        rms_norm_eps=float(hf.rms_norm_eps),
        rope_theta=float(rope["rope_theta"]),
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        dtype=str(dtype).removeprefix("torch."),
        bos_token_id=hf.bos_token_id,
        eos_token_ids=_eos_ids(hf.eos_token_id),
        rope_scaling=scaling,
    )


SUPPORTED_ROPE = ("default", "yarn")


def rope_scaling(rope: dict, max_position_embeddings: int) -> RopeScaling | None:
    """YaRN parameters from transformers' rope_parameters (5.x; `rope_scaling` of 4.x configs is
    read into it, `type` as `rope_type`), or None for plain RoPE."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in SUPPORTED_ROPE:
        raise ValueError(
            f"rope_type={kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE)} "
            "(remove rope_scaling from config.json to run at the native context length)"
        )
    if kind == "default":
        return None
    original = rope.get("original_max_position_embeddings") or max_position_embeddings
    factor = rope.get("factor") or max_position_embeddings / original
    if factor < 1:
        raise ValueError(f"rope_scaling factor={factor} must be at least 1")
    keys = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")
    return RopeScaling("yarn", float(factor), int(original), **{k: rope[k] for k in keys if rope.get(k) is not None})
