from __future__ import annotations

from atb_llm.models.base.router import BaseRouter
from atb_llm.models.qwen2_mlgc.config_qwen2_mlgc import load_qwen2_config
from atb_llm.models.qwen2_mlgc.flash_causal_qwen2_mlgc import FlashQwen2MlgcForCausalLM


class Qwen2MlgcRouter(BaseRouter):
    model_type = "qwen2"

    def get_config(self):
        return load_qwen2_config(self.weight_dir)

    def get_model_cls(self):
        return FlashQwen2MlgcForCausalLM
