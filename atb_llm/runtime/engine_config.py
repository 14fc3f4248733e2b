"""Every knob of the engine in one place: the dataclass, its command-line flags (MindIE run_pa's
names) and their checks. Entry points add the flags to their parser and build the config from
the parsed namespace, so a flag is spelled, documented and validated once."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

DTYPE_CHOICES = ("bf16", "fp16", "fp32")
QUANTIZE_CHOICES = ("w8a16", "w4a16")  # made at load from a float folder


@dataclass
class EngineConfig:
    """model_path: a Hugging Face Qwen2 folder (bf16/fp16/fp32, or msModelSlim output).
    dtype: None = the checkpoint's. mlgc: off | auto | PLAN path | streaming | random (see
    atb_llm.compression.plan). quantize: w8a16 | w4a16 quantizes a float folder at load (round
    to nearest); a folder written by msModelSlim is read as it is. quantize_lm_head: w8a16 | w4a16
    quantizes the LM head the same way at load, whatever the folder (msModelSlim keeps it in float;
    it is the largest single read of a decode step). kv_quant: c8 stores every
    group's K/V in int8 (a C8 checkpoint turns it on by itself). chunked_prefill: prefill at most
    max_prefill_tokens tokens per step, a longer prompt over several steps between decode steps
    (otherwise a prompt is prefilled in one step, however long). prefix_caching: a prompt that
    starts with blocks another request computed shares them instead of computing them again.
    attention_backend: torch | triton | npu; None = by device. triton also runs the quantized linears
    in the GPU kernels (on CPU tensors only under Triton's interpreter, TRITON_INTERPRET=1).
    enforce_eager: on CUDA with the triton backend, run decode eagerly instead of replaying CUDA
    graphs captured per batch-size bucket (see atb_llm.runtime.cuda_graph). lora_modules: LoRA
    adapters served beside the base model, {name: PEFT folder} (or ["NAME=PATH", ...] as the flag
    takes them), added to those the weight folder's lora_adapter.json lists (atb_llm.models.base.lora).
    speculative: ngram verifies up to num_speculative_tokens tokens a step, proposed by prompt lookup
    (the longest suffix of up to ngram_max tokens that occurred before, and what followed it); draft
    proposes them by greedy decoding of draft_model (a smaller model of the same tokenizer, on its
    own paged cache, compressed by draft_mlgc); the output is what decoding without it gives
    (atb_llm.runtime.speculative)."""

    model_path: str
    dtype: str | None = None
    device: str = "cpu"
    max_batch_size: int = 8
    max_input_length: int = 2048
    max_output_length: int = 256
    max_prefill_tokens: int = 8192
    chunked_prefill: bool = False
    prefix_caching: bool = False
    block_size: int = 128
    num_blocks: int | None = None
    cache_memory_gb: float | None = None
    mlgc: str = "off"
    quantize: str | None = None
    kv_quant: str | None = None
    progress: bool = True
    attention_backend: str | None = None
    enforce_eager: bool = False
    lora_modules: dict[str, str] | None = None
    speculative: str | None = None
    num_speculative_tokens: int = 4
    ngram_max: int = 3
    draft_model: str | None = None
    draft_mlgc: str = "off"
    quantize_lm_head: str | None = None

    def __post_init__(self):
        for name in ("max_batch_size", "max_input_length", "max_output_length", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.dtype is not None and self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; use one of {', '.join(DTYPE_CHOICES)}")
        if self.quantize not in (None, *QUANTIZE_CHOICES):
            raise ValueError(f"quantize={self.quantize!r} is not supported; use one of {', '.join(QUANTIZE_CHOICES)}")
        if self.quantize_lm_head not in (None, *QUANTIZE_CHOICES):
            raise ValueError(
                f"quantize_lm_head={self.quantize_lm_head!r} is not supported; use one of {', '.join(QUANTIZE_CHOICES)}"
            )
        if self.kv_quant not in (None, "c8"):
            raise ValueError(f"kv_quant={self.kv_quant!r} is not supported; use c8 (or none)")
        if self.speculative not in (None, "ngram", "draft"):
            raise ValueError(
                f"speculative={self.speculative!r} is not supported; use ngram (prompt lookup) or draft (with "
                "--draft_model), or leave it out"
            )
        if (self.speculative == "draft") != (self.draft_model is not None):
            raise ValueError(
                f"speculative={self.speculative!r} with draft_model={self.draft_model!r}: a draft model goes with "
                "--speculative draft, and --speculative draft needs --draft_model WEIGHT_DIR"
            )
        for name in ("num_speculative_tokens", "ngram_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if isinstance(self.lora_modules, (list, tuple)):
            pairs = {}
            for item in self.lora_modules:
                name, sep, path = item.partition("=")
                if not sep or not name or not path:
                    raise ValueError(f"--lora_modules {item!r} is not NAME=PATH; write e.g. sql=/models/sql-lora")
                if name in pairs:
                    raise ValueError(f"--lora_modules names {name!r} twice; give each adapter its own name")
                pairs[name] = path
            self.lora_modules = pairs

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, **defaults) -> argparse.ArgumentParser:
        """The engine's flags, MindIE style (`--block_size`); `defaults` overrides a default by field name."""
        d = {f.name: f.default for f in fields(EngineConfig) if f.name != "model_path"} | defaults
        g = parser.add_argument_group("engine")
        g.add_argument(
            "--model_path", "-m", default=None, help="Hugging Face weight folder (default: the default model)"
        )
        g.add_argument("--dtype", default=d["dtype"], choices=DTYPE_CHOICES, help="default: the checkpoint's")
        g.add_argument("--device", default=d["device"], help="cpu, cuda or npu")
        g.add_argument("--max_batch_size", type=int, default=d["max_batch_size"], help="sequences per step")
        g.add_argument("--max_input_length", type=int, default=d["max_input_length"], help="longest prompt, tokens")
        g.add_argument("--max_output_length", type=int, default=d["max_output_length"], help="most new tokens")
        g.add_argument("--max_prefill_tokens", type=int, default=d["max_prefill_tokens"], help="tokens per prefill")
        g.add_argument(
            "--chunked_prefill",
            action=argparse.BooleanOptionalAction,
            default=d["chunked_prefill"],
            help="prefill long prompts in chunks of max_prefill_tokens, between decode steps",
        )
        g.add_argument(
            "--prefix_caching",
            action=argparse.BooleanOptionalAction,
            default=d["prefix_caching"],
            help="share the cache blocks of prompt prefixes computed before",
        )
        g.add_argument("--block_size", type=int, default=d["block_size"], help="tokens per cache block (x16)")
        g.add_argument("--num_blocks", type=int, default=d["num_blocks"], help="cache blocks (default: fit the batch)")
        g.add_argument("--cache_memory_gb", type=float, default=d["cache_memory_gb"], help="cache budget instead")
        g.add_argument("--mlgc", default=d["mlgc"], help="KV compression: off | auto | PLAN.json | streaming | random")
        g.add_argument("--quantize", default=d["quantize"], choices=QUANTIZE_CHOICES, help="quantize at load")
        g.add_argument(
            "--quantize_lm_head", default=d["quantize_lm_head"], choices=QUANTIZE_CHOICES, help="the LM head too"
        )
        g.add_argument("--kv_quant", default=d["kv_quant"], choices=["c8"], help="int8 KV cache")
        g.add_argument(
            "--attention_backend",
            default=d["attention_backend"],
            choices=["torch", "triton", "npu"],
            help="default: by device",
        )
        g.add_argument(
            "--enforce_eager",
            action="store_true",
            default=d["enforce_eager"],
            help="CUDA: decode without CUDA graphs",
        )
        g.add_argument(
            "--lora_modules",
            nargs="+",
            default=d["lora_modules"],
            metavar="NAME=PATH",
            help="LoRA adapters (PEFT folders) to serve beside the base model",
        )
        g.add_argument(
            "--speculative",
            default=d["speculative"],
            choices=["ngram", "draft"],
            help="speculative decoding (same output, fewer passes): ngram = prompt lookup, draft = a draft model",
        )
        g.add_argument("--draft_model", default=d["draft_model"], help="--speculative draft: the draft model's folder")
        g.add_argument("--draft_mlgc", default=d["draft_mlgc"], help="the draft model's KV compression (as --mlgc)")
        g.add_argument(
            "--num_speculative_tokens", type=int, default=d["num_speculative_tokens"], help="tokens verified a step"
        )
        g.add_argument("--ngram_max", type=int, default=d["ngram_max"], help="longest suffix prompt lookup matches")
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides) -> EngineConfig:
        """The config from a namespace parsed with `add_cli_args`; `overrides` win (e.g. a resolved model_path)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**(values | overrides))
