"""The model configuration the engine runs on, read from a Hugging Face `config.json`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"dtype={name!r} is not supported; use one of bf16, fp16, fp32") from None


def read_json(path: Path, fix: str):
    """A JSON file, or a ValueError that names the file, what is wrong and `fix`."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {fix}") from None


def read_config_json(weight_dir: str | Path) -> dict:
    weight_dir = Path(weight_dir)
    if not weight_dir.is_dir():
        raise FileNotFoundError(
            f"weight directory {str(weight_dir)!r} does not exist; pass a Hugging Face model folder "
            "(config.json, *.safetensors, tokenizer files) with -m/--model_path"
        )
    path = weight_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; a Hugging Face model folder needs its config.json")
    config = read_json(path, "restore it from the original model folder")
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, not a JSON object; restore it from the model folder")
    return config


@dataclass(frozen=True)
class RopeScaling:
    """Static YaRN (the long-context RoPE Qwen2.5's model cards configure): frequencies interpolated
    by `factor` below the ramp between `beta_slow` and `beta_fast` rotations over the pretraining
    length, kept above it, and cos/sin scaled by `attention_factor` (default 0.1 ln(factor) + 1)."""

    rope_type: str
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer; every field the engine reads."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: str  # the checkpoint's dtype name: bfloat16, float16 or float32
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    rope_scaling: RopeScaling | None = None  # None: plain RoPE

    @property
    def num_groups(self) -> int:
        """Attention-head groups: one per KV head per layer, the unit MLGC compresses."""
        return self.num_hidden_layers * self.num_key_value_heads

    @property
    def queries_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def config_hash(self) -> str:
        """Identity of the model's shapes, stored in compression plans so a plan never meets the wrong model."""
        keys = (
            "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta",
        )  # fmt: skip
        fields = {k: asdict(self)[k] for k in keys}
        if self.rope_scaling is not None:  # plans made without it keep their hash
            fields["rope_scaling"] = asdict(self.rope_scaling)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
