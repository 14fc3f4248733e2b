"""Compression plans (placeholder until MLGC plans land): resolves --mlgc to a group layout."""

from __future__ import annotations

from atb_llm.cache.layout import GroupLayout
from atb_llm.models.base.config import ModelConfig


def resolve_layout(mlgc: str, model_path: str, config: ModelConfig, block_size: int) -> GroupLayout:
    if mlgc in (None, "", "off"):
        return GroupLayout.uniform(config.num_hidden_layers, config.num_key_value_heads)
    raise ValueError(f"mlgc={mlgc!r} is not supported yet; use off")
