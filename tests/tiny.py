"""Tiny random Qwen2 checkpoints (Hugging Face format) and a tiny tokenizer, built in tests."""

from __future__ import annotations

from pathlib import Path

import torch

QUANT_KINDS = {  # quantized tiny checkpoints (conftest `quantized`): variant -> (converter type, W4A16 group size)
    "w8a16": ("w8a16", 128),
    "w4a16": ("w4a16", 128),
    "w4a16_per_channel": ("w4a16", 0),
    "w8a8": ("w8a8", 128),
    "w8a8_dynamic": ("w8a8_dynamic", 128),
    "w8a8s": ("w8a8s", 128),
}

TEXT = "hello world the quick brown fox jumps over the lazy dog 0123456789 def return if else"


# ChatML, as Qwen2.5's template writes a conversation (without its default system message)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(path: Path, chat: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat:
        fast.chat_template = CHATML
    fast.save_pretrained(str(path))
    return fast


def build_tiny_qwen2(
    path: Path,
    tie: bool = False,
    seed: int = 0,
    num_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    std: float = 0.15,
    dtype=torch.float32,
    chat: bool = False,
) -> Path:
    """A random Qwen2ForCausalLM saved with save_pretrained (safetensors); returns the folder. `chat`:
    the tokenizer has a ChatML chat template."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path, chat)
    cfg = Qwen2Config(
        vocab_size=320,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
        initializer_range=std,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.pad_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # non-trivial biases and norms, so loading mistakes show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def hf_greedy(path: Path, prompts: list[list[int]], max_new_tokens: int, dtype=torch.float32) -> list[list[int]]:
    """Greedy continuations by Hugging Face transformers, one prompt at a time (stops at eos)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    out = []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(
                torch.tensor([ids]),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            )
            out.append(gen[0, len(ids) :].tolist())
    return out


def make_adapter(base, out, targets=None, r=8, rslora=False, seed=0, alpha=16):
    """A PEFT LoRA adapter of the model at `base` with random non-zero B (it changes greedy choices)."""
    from benchmarks.bench_lora import TARGETS, random_adapter

    return random_adapter(base, out, targets or TARGETS, r, rslora, seed, alpha)
