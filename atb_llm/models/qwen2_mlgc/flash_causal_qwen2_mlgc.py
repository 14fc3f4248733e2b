"""Qwen2 / Qwen2.5 on the paged, per-group (MLGC) KV cache.

Reads top to bottom: Attention -> MLP -> DecoderLayer -> Model -> ForCausalLM. Tokens of all
sequences are packed in one flat batch; the cache and its tables are passed in, never allocated
here; how each group keeps its history is the cache's business, not the model's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atb_llm.cache.kv_cache import KVCache
from atb_llm.config import ModelConfig
from atb_llm.layers.attention.backend import AttentionBackend
from atb_llm.layers.attention.metadata import AttentionMetadata
from atb_llm.layers.attention.paged_attention import PagedAttention
from atb_llm.layers.embedding import LMHead, VocabEmbedding
from atb_llm.layers.linear import MergedLinear, ReplicatedLinear
from atb_llm.layers.norm import RMSNorm
from atb_llm.layers.parallel import SINGLE, TensorParallel
from atb_llm.layers.rotary import RotaryEmbedding
from atb_llm.models.base.flash_causal_lm import FlashForCausalLM
from atb_llm.models.base.forward_batch import ForwardBatch
from atb_llm.quantization.config import QuantConfig


class Qwen2Attention(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_idx: int, backend: AttentionBackend, quant: QuantConfig, tp: TensorParallel
    ):
        super().__init__()
        # this rank's heads: its share of the query heads and of the KV heads they read
        self.num_heads = tp.local(config.num_attention_heads, "num_attention_heads")
        self.num_kv_heads = tp.local(config.num_key_value_heads, "num_key_value_heads")
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        prefix = f"model.layers.{layer_idx}.self_attn"
        shards = {"q": self.q_size, "k": self.kv_size, "v": self.kv_size}
        qkv_method = quant.method(prefix, ("q_proj", "k_proj", "v_proj"))
        self.qkv_proj = MergedLinear(config.hidden_size, shards, True, qkv_method, tp, "column")
        o_method = quant.method(f"{prefix}.o_proj")
        self.o_proj = ReplicatedLinear(self.q_size, config.hidden_size, False, o_method, tp, "row")
        kv_scales = quant.kv_cache_scales  # C8: per-channel K/V smoothing before the int8 cache
        self.attn = PagedAttention(
            layer_idx, self.head_dim**-0.5, backend, self.num_kv_heads, self.head_dim, kv_scales, tp
        )

    def forward(
        self, rope: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden).view(-1, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta, rope).flatten(1))  # RoPE: the attention layer's


class Qwen2MLP(nn.Module):
    # Long prefills run the MLP in token chunks: bounds the [T, 2 * intermediate] activation and,
    # on CPU, keeps it in cache (2K tokens of the 0.5B model: 30 ms instead of 45 ms per layer).
    chunk_tokens = 256

    def __init__(self, config: ModelConfig, layer_idx: int, quant: QuantConfig, tp: TensorParallel):
        super().__init__()
        prefix, inter = f"model.layers.{layer_idx}.mlp", tp.local(config.intermediate_size, "intermediate_size")
        up_method = quant.method(prefix, ("gate_proj", "up_proj"))
        self.gate_up_proj = MergedLinear(config.hidden_size, {0: inter, 1: inter}, False, up_method, tp, "column")
        down_method = quant.method(f"{prefix}.down_proj")
        self.down_proj = ReplicatedLinear(inter, config.hidden_size, False, down_method, tp, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.chunk_tokens:
            lora = self.gate_up_proj.lora or self.down_proj.lora
            if lora is None:
                return torch.cat([self._forward(c) for c in x.split(self.chunk_tokens)])
            out = []
            for start, c in zip(range(0, x.shape[0], self.chunk_tokens), x.split(self.chunk_tokens)):
                with lora.state.rows(start, c.shape[0]):  # the chunk's rows of each adapter
                    out.append(self._forward(c))
            return torch.cat(out)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Qwen2DecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_idx: int, backend: AttentionBackend, quant: QuantConfig, tp: TensorParallel
    ):
        super().__init__()
        fused = backend.fused_norm
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fused)
        self.self_attn = Qwen2Attention(config, layer_idx, backend, quant, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fused)
        self.mlp = Qwen2MLP(config, layer_idx, quant, tp)

    def forward(self, rope, hidden, residual, kv_cache, meta) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(rope, hidden, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class Qwen2Model(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend, quant: QuantConfig, tp: TensorParallel):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        self.layers = nn.ModuleList(
            Qwen2DecoderLayer(config, i, backend, quant, tp) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend.fused_norm)

    def forward(self, input_ids, positions, kv_cache, meta) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        rope = self.rotary.table(positions, hidden.dtype)
        for layer in self.layers:
            hidden, residual = layer(rope, hidden, residual, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class FlashQwen2MlgcForCausalLM(FlashForCausalLM):
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(
        self,
        config: ModelConfig,
        backend: AttentionBackend,
        quant: QuantConfig | None = None,
        tp: TensorParallel = SINGLE,
    ):
        super().__init__(config, quant or QuantConfig(), tp)
        self.model = Qwen2Model(config, backend, self.quant, tp)
        tied = config.tie_word_embeddings
        self.lm_head = LMHead(
            config.vocab_size, config.hidden_size, SINGLE if tied else tp, self.quant.lm_head_method()
        )
        if tied:  # the embedding is whole on every rank, so is the LM head that shares it
            self.lm_head.tie_to(self.model.embed_tokens)

    @torch.inference_mode()
    def forward(self, b: ForwardBatch) -> torch.Tensor:
        """Returns logits [N, vocab] in fp32 (N = len(b.lm_head_indices), else T). Chunked prefill
        (MindIE's SplitFuse): sequence i brings tokens input_lengths[i] - q_lens[i] .. input_lengths[i]."""
        kv = b.kv_cache
        meta = AttentionMetadata.build(
            b.is_prefill,
            b.block_tables,
            b.slots,
            b.input_lengths,
            b.max_seq_len,
            kv.block_size,
            kv.dtype,
            b.q_lens,
            b.spec,
        )
        self.set_lora(b.lora)
        hidden = self.model(b.input_ids, b.position_ids, kv, meta)
        return self.lm_head(hidden, b.lm_head_indices)
