"""What compression costs in accuracy, on the default model: passkey retrieval and perplexity.

    python -m benchmarks.bench_accuracy [--tasks passkey ppl] [--out DIR]

Caches: the full cache, MLGC plans calibrated at full ratio 0.25 and 0.5, streaming (every group a
window) and random (the 0.25 budget on random groups); sink 64, recent 1024 (aligned), block 128.
Prefill always attends over the whole prompt; compression shows in what decode reads.

- passkey: a 5-digit key hidden in filler text at 10 depths, contexts 2K / 4K / 8K tokens; pass =
  the key appears in the greedy answer (chat template, 24 tokens).
- ppl: GPL-3 (/usr/share/common-licenses/GPL-3) in 2048-token segments; 64 tokens prefilled, the
  rest teacher-forced through decode; perplexity over all forced tokens and over those past the
  window (positions >= sink + recent + 1), where window groups hold a compressed history.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from tqdm import tqdm

from atb_llm.compression.layout import GroupLayout
from atb_llm.compression.memory import kv_bytes
from atb_llm.compression.plan import MlgcPlan, baseline_plan
from atb_llm.models.base.router import get_router
from atb_llm.runtime.calibration import CalibrationConfig, calibrate
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams
from atb_llm.utils.default_model import resolve_model_path
from benchmarks.common import engine_config, markdown_table
from benchmarks.ruler_tasks import FILLER

HERE = Path(__file__).parent
GPL = Path("/usr/share/common-licenses/GPL-3")
DEPTHS = [i / 10 + 0.05 for i in range(10)]


def plans(
    model: str, out: Path, block_size: int, sink: int, recent: int, ratios: list[float], only: list[str] | None
) -> dict[str, MlgcPlan | None]:
    """The caches compared, by name (None = full cache), all or `only` these: random takes the
    first ratio's budget. Calibrated plans are cached in `out`; only those compared are made."""
    config = get_router(model).get_config()
    found: dict[str, MlgcPlan | None] = {"full": None}
    for ratio in ratios:
        if only and f"MLGC {ratio}" not in only:
            continue
        path = out / f"plan_razor_{ratio}.json"
        if not path.is_file():
            cal = CalibrationConfig(ratio, sink=sink, recent=recent, block_size=block_size)
            calibrate(model, cal, progress=False).save(path)
        found[f"MLGC {ratio}"] = MlgcPlan.load(path)
    found["streaming"] = baseline_plan("streaming", config, block_size, sink, recent)
    found[f"random {ratios[0]}"] = baseline_plan("random", config, block_size, sink, recent, full_ratio=ratios[0])
    return {name: plan for name, plan in found.items() if not only or name in only}


def engine_for(args: argparse.Namespace, plan: MlgcPlan | None, max_input: int) -> LLMEngine:
    cfg = engine_config(args, max_batch_size=4, max_input_length=max_input, max_output_length=2048, progress=False)
    return LLMEngine(cfg, layout=plan.to_layout() if plan else None)


def engine_kv_share(engine: LLMEngine, n: int, block_size: int) -> float:
    cfg = engine.model_config
    full = GroupLayout.uniform(cfg.num_hidden_layers, cfg.num_key_value_heads)
    return kv_bytes(engine.layout, n, cfg.head_dim, engine.dtype, block_size) / kv_bytes(
        full, n, cfg.head_dim, engine.dtype, block_size
    )


def passkey_prompts(engine: LLMEngine, context: int, seed: int = 0) -> list[tuple[list[int], str]]:
    rng = random.Random(seed + context)
    tok = engine.tokenizer
    per_filler = len(tok.encode(FILLER))
    out = []
    for depth in DEPTHS:
        key = str(rng.randrange(10000, 100000))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
        n = max(1, (context - 120) // per_filler)
        before = int(n * depth)
        text = (
            "There is important information hidden inside a lot of irrelevant text. Find it and memorize it. "
            + FILLER * before
            + needle
            + FILLER * (n - before)
            + "\nWhat is the pass key?"
        )
        out.append((engine.encode(text, chat=True), key))
    return out


def run_passkey(engine: LLMEngine, contexts: list[int]) -> dict[int, float]:
    rates = {}
    for context in contexts:
        items = passkey_prompts(engine, context)
        outs = engine.generate([ids for ids, _ in items], SamplingParams(max_tokens=24))
        rates[context] = sum(key in o.text for o, (_, key) in zip(outs, items)) / len(items)
    return rates


def run_ppl(engine: LLMEngine, segment: int, prefix: int, window_end: int) -> tuple[float, float]:
    ids = engine.tokenizer.encode(GPL.read_text())
    segs = [ids[i : i + segment] for i in range(0, len(ids) - segment + 1, segment)]
    params = [SamplingParams(force_tokens=tuple(s[prefix:])) for s in segs]
    outs = engine.generate([s[:prefix] for s in segs], params)
    nll_all, nll_far, n_far = 0.0, 0.0, 0
    for seg, out in zip(segs, outs):
        for pos, (tok, lp) in enumerate(zip(seg[prefix:], out.logprobs), start=prefix):
            nll_all -= lp[tok]
            if pos >= window_end:
                nll_far -= lp[tok]
                n_far += 1
    n_all = sum(len(s) - prefix for s in segs)
    return math.exp(nll_all / n_all), math.exp(nll_far / max(n_far, 1))


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["passkey", "ppl"], choices=["passkey", "ppl"])
    ap.add_argument("--contexts", nargs="+", type=int, default=[2048, 4096, 8192])
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--recent", type=int, default=1024)
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5], help="full ratios of calibrated plans")
    ap.add_argument("--caches", nargs="*", default=None, help="only these caches, by name (default: all)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    EngineConfig.add_cli_args(ap)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model = str(resolve_model_path(args.model_path))
    caches = plans(model, args.out, args.block_size, args.sink, args.recent, args.ratios, args.caches)
    done_path = args.out / "accuracy_rows.json"  # rows so far: a stopped run resumes where it was
    done = json.loads(done_path.read_text()) if done_path.is_file() else {}
    rows = []
    for name, plan in tqdm(caches.items(), desc="Caches"):
        key = f"{name}|{args.tasks}|{args.contexts}|{args.sink}|{args.recent}|{args.block_size}"
        if key in done:
            rows.append(done[key])
            continue
        engine = engine_for(args, plan, max(args.contexts) + 256)
        row = {"cache": name, "kv at 8K": f"{engine_kv_share(engine, 8192, args.block_size):.0%}"}
        if "passkey" in args.tasks:
            for context, rate in run_passkey(engine, args.contexts).items():
                row[f"passkey {context // 1024}K"] = f"{rate:.0%}"
        if "ppl" in args.tasks:
            window_end = args.sink + (plan.recent if plan else args.recent) + 1
            row["ppl GPL-3"], row["ppl past window"] = run_ppl(engine, 2048, 64, window_end)
        rows.append(row)
        done[key] = row
        done_path.write_text(json.dumps(done, indent=1))
        del engine
    columns = list(rows[0])
    text = f"Default model, bf16, sink={args.sink}, recent={args.recent} (aligned), block_size={args.block_size}\n\n"
    text += markdown_table(rows, columns) + "\n"
    (args.out / "accuracy.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
