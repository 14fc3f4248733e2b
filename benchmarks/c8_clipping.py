"""How well msModelSlim's C8 scales fit the K/V a runtime caches, and what the int8 cache costs.

msModelSlim calibrates `k_proj.kv_cache_scale` on the output of k_proj, before RoPE; the cache
holds keys after RoPE, which mixes each channel i with its partner i + head_dim/2. This runs the
float model on text, takes every layer's keys (before and after RoPE) and values, and reports per
variant the share of values outside the int8 range and the relative error of the int8 round trip:

- `static pre-RoPE`: the checkpoint's scales on the keys they were calibrated on;
- `static post-RoPE`: the same scales on the keys actually cached;
- `static post-RoPE, paired`: scale sqrt(s_i^2 + s_j^2) for both channels of a rotary pair, which
  bounds |rot(k)| whenever |k_i| <= 127 s_i and |k_j| <= 127 s_j;
- `per-token`: a scale per token and head computed on the cached values, nothing else;
- `per-token, smoothed`: the same after dividing each channel by the checkpoint's scale (paired
  for keys): what the engine does with a C8 checkpoint (PagedAttention).

With `--ppl [CACHE ...]`, also the perplexity of GPL-3 teacher-forced through decode (64 tokens
prefilled, the rest read back from the cache) for the float cache and the int8 cache without
smoothing, smoothed by scales measured at load (what `--kv_quant c8` does), and smoothed by the
checkpoint's scales, with the share of positions whose most likely token is the float cache's.

    python -m benchmarks.c8_clipping --float DIR --c8 QUANT_DIR [--samples 8] [--ppl]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from atb_llm.compression.levels import Storage
from atb_llm.entrypoints.convert_quant_weight import boolq_passages
from atb_llm.layers.attention.paged_attention import load_kv_cache_scale, pair_norm
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams
from benchmarks.bench_accuracy import GPL
from benchmarks.common import markdown_table

HERE = Path(__file__).parent


def c8_scales(folder: Path) -> dict[str, torch.Tensor]:
    """`model.layers.N.self_attn.{k,v}_proj.kv_cache_scale` -> [kv_heads * head_dim] (offsets are checked to be 0)."""
    out = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            for name in sf.keys():
                if name.endswith("kv_cache_scale"):
                    out[name] = sf.get_tensor(name).float()
                if name.endswith("kv_cache_offset") and sf.get_tensor(name).any():
                    raise SystemExit(f"{name} is not zero: this measures symmetric C8 only")
    if not out:
        raise SystemExit(f"{folder} has no k_proj.kv_cache_scale tensors: not a C8 checkpoint")
    return out


def scale_of(scales: dict[str, torch.Tensor], layer: int, proj: str) -> torch.Tensor:
    return scales[f"model.layers.{layer}.self_attn.{proj}_proj.kv_cache_scale"]


def texts(samples: int) -> list[str]:
    rows = [json.loads(x) for x in boolq_passages().read_text().splitlines() if x.strip()]
    return [r.get("inputs_pretokenized") or r.get("text") for r in rows[-samples:]]  # not the calibration head


def activations(float_dir: Path, samples: int) -> tuple[dict, dict, dict, int]:
    """layer -> keys before RoPE, keys after RoPE, values [tokens, kv_heads, head_dim]; and head_dim."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    tok = AutoTokenizer.from_pretrained(str(float_dir))
    model = AutoModelForCausalLM.from_pretrained(str(float_dir), dtype=torch.float32).eval()
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    pre: dict[int, list] = {}
    val: dict[int, list] = {}

    def keep(into: dict, n: int):
        return lambda module, inputs, out: into.setdefault(n, []).append(out[0])

    hooks = [layer.self_attn.k_proj.register_forward_hook(keep(pre, n)) for n, layer in enumerate(model.model.layers)]
    hooks += [layer.self_attn.v_proj.register_forward_hook(keep(val, n)) for n, layer in enumerate(model.model.layers)]
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

    def heads(d):
        return {n: torch.cat([x.view(x.shape[0], -1, hd) for x in xs]) for n, xs in d.items()}

    return heads(pre), heads(post), heads(val), hd


def round_trip(x: torch.Tensor, scale: torch.Tensor) -> tuple[float, float]:
    """(share of values clipped, relative error) of int8 with `scale` broadcast over x."""
    y = x / scale
    clipped = (y.abs() > 127.5).float().mean().item()
    back = torch.round(y).clamp(-127, 127) * scale
    return clipped, ((back - x).norm() / x.norm()).item()


def per_token(x: torch.Tensor, smooth: torch.Tensor | None = None) -> tuple[float, float]:
    """The engine's int8 cache (its own quantizer): a scale per token and head, after dividing the
    channels by `smooth`."""
    y = x if smooth is None else x / smooth
    back = Storage.dequantize(*Storage.quantize(y.reshape(-1, y.shape[-1])), torch.float32).view_as(y)
    back = back if smooth is None else back * smooth
    return 0.0, ((back - x).norm() / x.norm()).item()


def round_trips(scales: dict, pre: dict, post: dict, val: dict, hd: int) -> list[dict]:
    sums: dict[str, list] = {}
    for n in sorted(post):
        ks, vs = scale_of(scales, n, "k").view(-1, hd), scale_of(scales, n, "v").view(-1, hd)
        paired = pair_norm(ks)  # one scale per rotary pair, as the engine takes them
        for name, (clipped, err) in (
            ("K static pre-RoPE", round_trip(pre[n], ks)),
            ("K static post-RoPE", round_trip(post[n], ks)),
            ("K static post-RoPE, paired", round_trip(post[n], paired)),
            ("K per-token", per_token(post[n])),
            ("K per-token, smoothed (engine)", per_token(post[n], paired)),
            ("V static", round_trip(val[n], vs)),
            ("V per-token", per_token(val[n])),
            ("V per-token, smoothed (engine)", per_token(val[n], vs)),
        ):
            sums.setdefault(name, []).append((clipped, err))
    return [
        {
            "int8 round trip": name,
            "clipped_%": 100 * sum(c for c, _ in v) / len(v),
            "worst_layer_clipped_%": 100 * max(c for c, _ in v),
            "rel_error_%": 100 * sum(e for _, e in v) / len(v),
        }
        for name, v in sums.items()
    ]


def forced_decode(engine: LLMEngine, segment: int = 2048, prefix: int = 64) -> tuple[list[float], list[int]]:
    """GPL-3 in `segment`-token pieces, `prefix` prefilled and the rest teacher-forced through decode
    -> each forced token's log-probability and the most likely token at its position."""
    ids = engine.tokenizer.encode(GPL.read_text())
    segs = [ids[i : i + segment] for i in range(0, len(ids) - segment + 1, segment)]
    params = [SamplingParams(force_tokens=tuple(s[prefix:]), logprobs=1) for s in segs]
    outs = engine.generate([s[:prefix] for s in segs], params)
    lps = [t.logprob for o in outs for t in o.output_logprobs]
    return lps, [t.top[0][0] for o in outs for t in o.output_logprobs]


PPL_CACHES = (
    "float cache",
    "int8, no smoothing",
    "int8, scales measured at load (--kv_quant c8)",
    "int8, the C8 checkpoint's scales",
)


def ppl_row(float_dir: Path, scales: dict, cache: str) -> dict:
    """The float model through decode with one of PPL_CACHES: perplexity and each position's top token."""
    cfg = EngineConfig(str(float_dir), dtype="fp32", max_input_length=64, max_output_length=2048, progress=False)
    cfg.kv_quant = None if cache == "float cache" else "c8"
    engine = LLMEngine(cfg)  # int8 levels: channel scales measured on a probe at load
    for n, layer in enumerate(engine.model.model.layers):
        attn = layer.self_attn.attn
        if cache == "int8, no smoothing":
            attn.kv_scale = None
        if cache == "int8, the C8 checkpoint's scales":  # as a C8 checkpoint of this model loads them
            for proj in "kv":
                load_kv_cache_scale(attn.kv_scale, scale_of(scales, n, proj), f"{proj}_proj.kv_cache_scale", proj)
    lps, top = forced_decode(engine)
    return {"cache": cache, "ppl": math.exp(-sum(lps) / len(lps)), "tokens": len(lps), "top1": top}


def ppl_table(float_dir: Path, scales: dict, caches: list[str], out: Path) -> str:
    """Rows are kept per cache in out/c8_ppl/ (runs of different caches can share the CPU's cores);
    the table has every row there, with the share of positions whose top token is the float cache's."""
    (out / "c8_ppl").mkdir(parents=True, exist_ok=True)
    for cache in tqdm(caches, desc="Caches"):
        row = ppl_row(float_dir, scales, cache)
        (out / "c8_ppl" / f"{PPL_CACHES.index(cache)}.json").write_text(json.dumps(row))
    rows = [json.loads(f.read_text()) for f in sorted((out / "c8_ppl").glob("*.json"))]
    ref = next((r["top1"] for r in rows if r["cache"] == "float cache"), None)
    table = [
        {
            "cache": r["cache"],
            "ppl GPL-3": f"{r['ppl']:.3f}",
            "same top-1 as float cache %": 100 * sum(a == b for a, b in zip(r["top1"], ref)) / len(ref) if ref else "",
            "tokens": r["tokens"],
        }
        for r in rows
    ]
    return markdown_table(table, list(table[0]))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--float", dest="float_dir", type=Path, required=True)
    ap.add_argument("--c8", type=Path, required=True, help="msModelSlim w8a8c8 output of the same model")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument(
        "--ppl", nargs="*", choices=PPL_CACHES, default=None,
        help="also the decode perplexity with these caches (no name: all; 16 min each on one core)",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    scales = c8_scales(args.c8)
    rows = round_trips(scales, *activations(args.float_dir, args.samples))
    text = f"int8 round trip of K and V, every layer, {args.samples} BoolQ passages, mean over layers\n\n"
    text += markdown_table(rows, list(rows[0]))
    if args.ppl is not None:
        text += "\n\nfp32, decode perplexity of GPL-3 (2048-token segments, 64 prefilled)\n\n"
        text += ppl_table(args.float_dir, scales, args.ppl or list(PPL_CACHES), args.out)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "c8_clipping.md").write_text(text + "\n")
    return rows


if __name__ == "__main__":
    main()
