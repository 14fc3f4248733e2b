"""model_type -> the model's router (config reader, model class, tokenizer)."""

from __future__ import annotations

import importlib
from pathlib import Path

from atb_llm.config import read_config_json
from atb_llm.quantization.config import QuantConfig, read_quant_config

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")  # fast, byte-level BPE, sentencepiece
ROUTERS = {"qwen2": "atb_llm.models.qwen2_mlgc.router_qwen2_mlgc:Qwen2MlgcRouter"}


class BaseRouter:
    model_type = ""

    def __init__(self, weight_dir: str | Path):
        self.weight_dir = Path(weight_dir)

    def get_config(self):
        raise NotImplementedError

    def get_model_cls(self):
        raise NotImplementedError

    def get_quant_config(self, on_load: str | None = None) -> QuantConfig:
        """The folder's quantization (msModelSlim description), or `on_load` (w8a16 | w4a16) for a float folder."""
        return read_quant_config(self.weight_dir, read_config_json(self.weight_dir), on_load)

    def get_tokenizer(self):
        from transformers import AutoTokenizer

        if not any((self.weight_dir / name).is_file() for name in TOKENIZER_FILES):
            raise FileNotFoundError(
                f"{self.weight_dir} has no tokenizer files ({' or '.join(TOKENIZER_FILES)}); copy them from "
                "the original model folder"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(self.weight_dir))
        if len(tokenizer) == 0:
            raise ValueError(f"the tokenizer in {self.weight_dir} is empty; copy the tokenizer files again")
        return tokenizer


def get_router(weight_dir: str | Path) -> BaseRouter:
    model_type = read_config_json(weight_dir).get("model_type")
    if model_type not in ROUTERS:
        raise ValueError(
            f"config.json in {weight_dir} has model_type={model_type!r}; supported model types: {sorted(ROUTERS)}"
        )
    module, name = ROUTERS[model_type].split(":")
    return getattr(importlib.import_module(module), name)(weight_dir)
