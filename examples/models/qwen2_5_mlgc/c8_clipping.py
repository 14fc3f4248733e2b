"""How well msModelSlim's static C8 scales fit the keys a runtime caches.

msModelSlim calibrates `k_proj.kv_cache_scale` on the output of k_proj, before RoPE; the cache
holds keys after RoPE, which mixes each channel i with its partner i + head_dim/2. This runs the
float model on text, takes every layer's keys before and after RoPE, and reports per variant the
share of values outside the int8 range and the relative error of the int8 round trip:

- `static pre-RoPE`: the checkpoint's scales on the keys they were calibrated on;
- `static post-RoPE`: the same scales on the keys actually cached;
- `static post-RoPE, paired`: scale sqrt(s_i^2 + s_j^2) for both channels of a rotary pair, which
  bounds |rot(k)| whenever |k_i| <= 127 s_i and |k_j| <= 127 s_j;
- `per-token`: a scale per token and head computed on the cached keys (the engine's int8 cache).

    python -m examples.models.qwen2_5_mlgc.c8_clipping --float DIR --c8 QUANT_DIR [--samples 8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open

from atb_llm.utils.perf import markdown_table
from examples.models.qwen2_5_mlgc.convert_quant_weight import boolq_passages

HERE = Path(__file__).parent


def c8_scales(folder: Path) -> dict[int, torch.Tensor]:
    """layer -> k_proj.kv_cache_scale [kv_heads * head_dim] (offsets are checked to be 0)."""
    out = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            for name in sf.keys():
                if name.endswith("k_proj.kv_cache_scale"):
                    out[int(name.split(".")[2])] = sf.get_tensor(name).float()
                if name.endswith("k_proj.kv_cache_offset") and sf.get_tensor(name).any():
                    raise SystemExit(f"{name} is not zero: this measures symmetric C8 only")
    if not out:
        raise SystemExit(f"{folder} has no k_proj.kv_cache_scale tensors: not a C8 checkpoint")
    return out


def texts(samples: int) -> list[str]:
    rows = [json.loads(x) for x in boolq_passages().read_text().splitlines() if x.strip()]
    return [r.get("inputs_pretokenized") or r.get("text") for r in rows[-samples:]]  # not the calibration head


def keys(float_dir: Path, samples: int) -> tuple[dict, dict, int]:
    """layer -> keys [tokens, kv_heads, head_dim] before and after RoPE, and head_dim."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    tok = AutoTokenizer.from_pretrained(str(float_dir))
    model = AutoModelForCausalLM.from_pretrained(str(float_dir), dtype=torch.float32).eval()
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    pre: dict[int, list] = {}
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(lambda m, i, o, n=n: pre.setdefault(n, []).append(o[0]))
        for n, layer in enumerate(model.model.layers)
    ]
    post: dict[int, list] = {}
    with torch.no_grad():
        for text in texts(samples):
            ids = tok(text, return_tensors="pt").input_ids[:, :1024]
            model(ids)
            cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), torch.arange(ids.shape[1])[None])
            for n, ks in pre.items():
                k = ks[-1].view(1, ids.shape[1], -1, hd).transpose(1, 2)
                _, k_rot = apply_rotary_pos_emb(k, k, cos, sin)
                post.setdefault(n, []).append(k_rot[0].transpose(0, 1))
    for h in hooks:
        h.remove()
    pre_t = {n: torch.cat([k.view(k.shape[0], -1, hd) for k in ks]) for n, ks in pre.items()}
    return pre_t, {n: torch.cat(ks) for n, ks in post.items()}, hd


def round_trip(k: torch.Tensor, scale: torch.Tensor) -> tuple[float, float]:
    """(share of values clipped, relative error) of int8 with `scale` broadcast over k."""
    x = k / scale
    clipped = (x.abs() > 127.5).float().mean().item()
    back = torch.round(x).clamp(-127, 127) * scale
    return clipped, ((back - k).norm() / k.norm()).item()


def paired(scale: torch.Tensor, hd: int) -> torch.Tensor:
    s = scale.view(-1, 2, hd // 2)
    both = (s[:, 0] ** 2 + s[:, 1] ** 2).sqrt()
    return torch.cat([both, both], -1).view(-1, hd)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--float", dest="float_dir", type=Path, required=True)
    ap.add_argument("--c8", type=Path, required=True, help="msModelSlim w8a8c8 output of the same model")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    scales = c8_scales(args.c8)
    pre, post, hd = keys(args.float_dir, args.samples)
    sums: dict[str, list] = {}
    for n in sorted(scales):
        s = scales[n].view(-1, hd)
        per_token = post[n].abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
        for name, k, sc in (
            ("static pre-RoPE", pre[n], s),
            ("static post-RoPE", post[n], s),
            ("static post-RoPE, paired", post[n], paired(s, hd)),
            ("per-token (engine)", post[n], per_token),
        ):
            sums.setdefault(name, []).append(round_trip(k, sc))
    rows = [
        {
            "keys": name,
            "clipped_%": 100 * sum(c for c, _ in v) / len(v),
            "worst_layer_clipped_%": 100 * max(c for c, _ in v),
            "rel_error_%": 100 * sum(e for _, e in v) / len(v),
        }
        for name, v in sums.items()
    ]
    table = markdown_table(rows, ["keys", "clipped_%", "worst_layer_clipped_%", "rel_error_%"])
    head = f"K int8 round trip, {len(scales)} layers, {args.samples} BoolQ passages, mean over layers\n\n"
    print(head + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "c8_clipping.md").write_text(head + table + "\n")
    return rows


if __name__ == "__main__":
    main()
