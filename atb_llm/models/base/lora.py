"""PEFT LoRA adapters: read from their folders (adapter_config.json + adapter_model.safetensors),
checked against the base model, and attached to its linears (atb_llm.layers.lora).

Adapters are named; `lora_adapter.json` in the base weight folder maps names to folders (the model
zoo's form, {"name": "path", ...}, relative paths from that folder), `--lora_modules NAME=PATH` adds
more (vLLM's form). "base" is reserved: the model without an adapter.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from atb_llm.config import read_json
from atb_llm.layers.linear import LinearBase, MergedLinear
from atb_llm.layers.lora import LoraState, LoraWeights

ADAPTER_INDEX = "lora_adapter.json"  # in the base weight folder: {"adapter name": "adapter folder"}
BASE = "base"
MAX_LORAS = 10  # the model zoo preloads at most this many
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


@dataclass
class Adapter:
    name: str
    path: Path
    rank: int
    scale: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # Hugging Face module name -> (A [r, in], B [out, r])


def _refuse(name: str, what: str) -> ValueError:
    return ValueError(f"LoRA adapter {name!r}: {what}")


def read_adapter(name: str, path: str | Path) -> Adapter:
    """One PEFT LoRA adapter folder, checked for what this engine supports."""
    path = Path(path)
    if name == BASE or not name or "=" in name:
        raise _refuse(name, f"{name!r} cannot name an adapter ({BASE!r} is the base model); choose another name")
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise _refuse(name, f"{cfg_path} does not exist; give the folder PEFT's save_pretrained wrote")
    cfg = read_json(cfg_path, "save the adapter again with PEFT")
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise _refuse(name, f"peft_type={peft_type!r}; only LORA adapters are served")
    unsupported = {
        "use_dora": (cfg.get("use_dora"), "DoRA"),
        "modules_to_save": (cfg.get("modules_to_save"), "modules saved whole (e.g. a retrained lm_head)"),
        "rank_pattern": (cfg.get("rank_pattern"), "per-module ranks"),
        "alpha_pattern": (cfg.get("alpha_pattern"), "per-module alphas"),
        "fan_in_fan_out": (cfg.get("fan_in_fan_out"), "transposed (Conv1D) weights"),
    }
    for key, (value, what) in unsupported.items():
        if value:
            raise _refuse(name, f"{key}={value!r}: {what} are not supported; train the adapter without it")
    if cfg.get("bias", "none") != "none":
        raise _refuse(name, f"bias={cfg['bias']!r}: adapters with biases are not supported; train with bias='none'")
    rank, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    if rank < 1:
        raise _refuse(name, f"r={rank} must be at least 1")
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    files = [path / f for f in ("adapter_model.safetensors",) if (path / f).is_file()]
    if not files:
        raise _refuse(name, f"{path} has no adapter_model.safetensors; save it with safe_serialization=True")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(files[0]).items():
        m = _KEY.match(key)
        if m is None:
            raise _refuse(name, f"tensor {key} is not a LoRA A/B weight; only q/k/v/o/gate/up/down LoRA is served")
        parts.setdefault(m.group(1), {})[m.group(2)] = tensor
    weights = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise _refuse(name, f"{module} has lora_{'B' if 'B' in ab else 'A'} without its pair")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise _refuse(name, f"{module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not have rank r={rank}")
        weights[module] = (a, b)
    if not weights:
        raise _refuse(name, f"{files[0]} holds no LoRA weights")
    return Adapter(name, path, rank, scale, weights)


def adapter_paths(model_path: str | Path, lora_modules: dict[str, str] | None) -> dict[str, Path]:
    """name -> folder: the base folder's lora_adapter.json, then `lora_modules` (which may not repeat a name)."""
    out: dict[str, Path] = {}
    index = Path(model_path) / ADAPTER_INDEX
    if index.is_file():
        listed = read_json(index, 'write it as {{"name": "adapter folder", ...}}')
        if not isinstance(listed, dict):
            raise ValueError(f'{index} must map adapter names to folders: {{"name": "path", ...}}')
        out = {str(k): (Path(model_path) / v).resolve() for k, v in listed.items()}
    for name, path in (lora_modules or {}).items():
        if name in out:
            raise ValueError(f"LoRA adapter {name!r} is named twice ({out[name]} and {path}); give each its own name")
        out[name] = Path(path)
    if len(out) > MAX_LORAS:
        raise ValueError(f"{len(out)} LoRA adapters asked for; at most {MAX_LORAS} are preloaded, drop some")
    return out


def attach_adapters(model, adapters: list[Adapter]) -> LoraState:
    """Stack the adapters (slot i + 1 = adapters[i]) into the linears they target; returns the state
    the model's forward sets the step's LoraBatch on. Checks every tensor against the base model."""
    state = LoraState()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, LinearBase)}
    per_linear: dict[str, list[tuple[int, object, torch.Tensor, torch.Tensor, float]]] = {}
    for slot, ad in enumerate(adapters, start=1):
        for module, (a, b) in ad.weights.items():
            target, shard = model._target(module + ".weight")
            ours = target.removesuffix(".weight")
            layer = linears.get(ours)
            if layer is None or module.rsplit(".", 1)[-1] not in TARGETS:
                why = f"targets {module}, not an adaptable linear of the base model ({', '.join(TARGETS)})"
                raise _refuse(ad.name, why + "; was it made for another model?")
            out = layer.offsets[shard][1] if isinstance(layer, MergedLinear) else layer.output_size
            if a.shape[1] != layer.input_size or b.shape[0] != out:
                why = f"{module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit {layer.input_size} -> {out}"
                raise _refuse(ad.name, why + " of the base model; it was made for another base model")
            per_linear.setdefault(ours, []).append((slot, shard, a, b, ad.scale))
    for ours, entries in per_linear.items():
        layer = linears[ours]
        shards = list(layer.offsets) if isinstance(layer, MergedLinear) else [None]
        width = max(a.shape[0] for _, _, a, _, _ in entries)  # columns per shard
        device, dtype = next(iter(layer.parameters())).device, layer.dtype  # the model dtype, whatever the format
        big_a = torch.zeros(len(adapters), width * len(shards), layer.input_size, dtype=dtype, device=device)
        big_b = torch.zeros(layer.output_size, len(adapters), width * len(shards), dtype=dtype, device=device)
        for slot, shard, a, b, scale in entries:
            j, r = shards.index(shard), a.shape[0]
            start, size = layer.offsets[shard] if shard is not None else (0, layer.output_size)
            big_a[slot - 1, j * width : j * width + r] = a.to(dtype)
            big_b[start : start + size, slot - 1, j * width : j * width + r] = (b.double() * scale).to(dtype)
        layer.lora = LoraWeights(big_a, big_b, state)
    return state
