"""Base class of the engine's models: built directly in the target dtype and device (no random
init), loaded from Hugging Face safetensors through per-parameter weight loaders."""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from atb_llm.config import ModelConfig
from atb_llm.layers.attention.backend import AttentionBackend
from atb_llm.layers.linear import LinearBase, default_weight_loader
from atb_llm.layers.lora import LoraBatch, LoraState
from atb_llm.layers.parallel import SINGLE, TensorParallel
from atb_llm.models.base.lora import Adapter, attach_adapters
from atb_llm.models.base.weights import WeightFiles
from atb_llm.quantization.config import QuantConfig


class FlashForCausalLM(nn.Module):
    # Hugging Face name fragment -> (our fused parameter fragment, shard id)
    packed_modules_mapping: dict[str, tuple[str, object]] = {}
    ignored_weights: tuple[str, ...] = ("rotary_emb.inv_freq",)  # checkpoint names that carry nothing we need

    def __init__(self, config: ModelConfig, quant: QuantConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.config, self.quant, self.tp = config, quant, tp
        # the quantization's own names (C8's K/V scales) first: "k_proj" is part of "k_proj.kv_cache_scale"
        self.name_mapping = {**quant.checkpoint_names, **self.packed_modules_mapping}
        self.ignored = self.ignored_weights + quant.ignored_weights
        self.lora_state: LoraState | None = None  # set by load_adapters

    def load_adapters(self, adapters: list[Adapter]) -> None:
        """Serve these LoRA adapters (slot i + 1 = adapters[i]) beside the base model (slot 0)."""
        if adapters and self.tp.world > 1:
            raise ValueError(
                f"LoRA adapters with tensor parallelism (world size {self.tp.world}) are not supported yet; "
                "serve adapters at world size 1"
            )
        self.lora_state = attach_adapters(self, adapters) if adapters else None

    def set_lora(self, batch: LoraBatch | None) -> None:
        """Every forward: which rows run with which adapter (the adapted linears read it)."""
        if self.lora_state is not None:
            self.lora_state.batch = batch
        elif batch is not None:
            raise ValueError("a step asks for LoRA adapters but the model has none loaded")

    @classmethod
    def build(
        cls,
        config: ModelConfig,
        backend: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        quant: QuantConfig | None = None,
        tp: TensorParallel = SINGLE,
    ) -> FlashForCausalLM:
        """Parameters are allocated uninitialized in `dtype` on `device` (quantized ones in their
        storage dtype, as `quant` picks per linear), this rank's share of them under `tp`; load them next."""
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                return cls(config, backend, quant, tp)
        finally:
            torch.set_default_dtype(previous)

    def _target(self, name: str) -> tuple[str, object]:
        for hf, (ours, shard_id) in self.name_mapping.items():
            if hf in name:
                return name.replace(hf, ours), shard_id
        return name, None

    def load_weights(self, weights: WeightFiles, progress: bool = True) -> None:
        params = dict(self.named_parameters())
        tied = self.config.tie_word_embeddings
        loaded: set[str] = set()
        for name, tensor in tqdm(weights, desc="Loading weights", disable=not progress, unit="tensor"):
            if any(i in name for i in self.ignored) or (tied and name == "lm_head.weight"):
                continue
            target, shard_id = self._target(name)
            param = params.get(target)
            if param is None:
                raise ValueError(
                    f"checkpoint tensor {name} has no place in {type(self).__name__} as config.json (and "
                    "quant_model_description.json, if any) describe it; the folder and its descriptions disagree"
                )
            getattr(param, "weight_loader", default_weight_loader)(param, tensor, name, shard_id)
            loaded.add(f"{target}:{shard_id}")
        expected = {f"{n}:{s}" for n, s in self._expected_names(params)}
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(
                f"checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. "
                f"{[m.split(':')[0] for m in missing[:3]]}; the folder is incomplete"
            )
        self.process_weights_after_loading()

    def _expected_names(self, params: dict) -> list[tuple[str, object]]:
        out = []
        for pname in params:
            shards = [(hf, s) for hf, (ours, s) in self.name_mapping.items() if ours in pname]
            out.extend((pname, s) for _, s in shards) if shards else out.append((pname, None))
        return out

    def process_weights_after_loading(self) -> None:
        for m in self.modules():
            if isinstance(m, LinearBase):
                m.method.process_weights_after_loading(m)
