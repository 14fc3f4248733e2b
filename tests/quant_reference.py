"""fp32 references of msModelSlim's quantized formats, computed from the raw checkpoint tensors
by its formulas (shared by the quantization and GPU-kernel tests)."""

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tiny import QUANT_KINDS


def tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def signed_nibbles(packed):
    """int8 bytes -> (low, high) signed int4 values."""
    b = packed.to(torch.int32) & 0xFF
    lo, hi = b & 0xF, b >> 4
    return torch.where(lo > 7, lo - 16, lo), torch.where(hi > 7, hi - 16, hi)


def reference_weight(t, name, kind, group):
    """fp32 W of linear `name` from the raw checkpoint tensors, by msModelSlim's formulas."""
    q, scale, offset = t[f"{name}.weight"], t[f"{name}.weight_scale"].float(), t[f"{name}.weight_offset"].float()
    if kind == "w4a16":
        lo, hi = signed_nibbles(q)
        if group:  # [N/2, K]: output rows 2i (low nibble) and 2i + 1 (high nibble)
            q = torch.stack([lo, hi], 1).reshape(-1, q.shape[1])
        else:  # [N, K/2]: input columns 2j and 2j + 1
            q = torch.stack([lo, hi], 2).reshape(q.shape[0], -1)
        reps = q.shape[1] // scale.shape[1]
        scale, offset = scale.repeat_interleave(reps, 1), offset.repeat_interleave(reps, 1)
    return (q.float() - offset) * scale


def dequantized_copy(float_model: Path, folder: Path, variant: str, dst: Path) -> Path:
    """A float (fp32) copy of `float_model` whose quantized linears hold the checkpoint's
    dequantized weights: the simple reference of a weight-only quantized model."""
    t, (kind, group) = tensors(folder), QUANT_KINDS[variant]
    shutil.copytree(float_model, dst)
    weights = load_file(str(dst / "model.safetensors"))
    for name in list(weights):
        base = name.removesuffix(".weight")
        if f"{base}.weight_scale" in t:
            weights[name] = reference_weight(t, base, kind, group)
    save_file({k: v.float() for k, v in weights.items()}, str(dst / "model.safetensors"))
    return dst
