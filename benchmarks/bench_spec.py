"""Speculative decoding by prompt lookup: batch-1 tokens/s on three workloads, the engine with it,
the engine without it and transformers' own prompt lookup, in one run on one machine.

    python -m benchmarks.bench_spec [-m WEIGHT_DIR] [--num_speculative_tokens 4] [--ngram_max 3]
        [--max_tokens 256] [--dtype bf16]
    python -m benchmarks.bench_spec --speculative draft --draft_model DRAFT_DIR  # transformers: assisted

Workloads (chat prompts, greedy, stopping at eos or --max_tokens): code editing (add type hints to
functions of Python's own textwrap module, given in the prompt), question answering over a passage
(the definitions of the GNU GPL v3, found on every Debian machine, answered by quoting them), and
free generation (a story, nothing to copy; with a repetition penalty of 1.2 in every setup, without
which the 0.5B model's greedy story loops, the case prompt lookup thrives on). Decode tokens/s =
(new tokens - 1) / (seconds of the request - seconds to its first token), the first token being
the prefill's, for every setup (transformers' first token is timed by a one-token generate).
"same text": whether the engine's greedy text with speculation equals its text without (always
in fp32; in bf16 a verify step's rows go through the matmuls as a batch, whose rounding differs
from one row's, as batching does without speculation, so a near tie may flip).
Results: results/speculative_<ngram|draft>_k<K>.md.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import textwrap
import time
from pathlib import Path

import torch

from atb_llm.config import parse_dtype
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams
from benchmarks.common import cpu_name, engine_config, load_hf, markdown_table

HERE = Path(__file__).parent
GPL = Path("/usr/share/common-licenses/GPL-3")


def workloads() -> dict[str, str]:
    code = inspect.getsource(textwrap.dedent) + "\n\n" + inspect.getsource(textwrap.indent)
    passage = GPL.read_text().split("  0. Definitions.")[1].split("  1. Source Code.")[0].strip()
    return {
        "code editing": "Add type hints to the signatures of these two functions. Change nothing else and "
        f"return the whole code.\n\n```python\n{code}```",
        "question over a passage": f"{passage}\n\nQuote, word for word, the two paragraphs of the passage above "
        'that define "propagate" and "convey".',
        "free generation": "Write a short original story about a lighthouse keeper who finds a strange map.",
    }


PENALTY = {"free generation": 1.2}  # greedy 0.5B stories loop without one; a loop is what lookup thrives on


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def engine_run(engine: LLMEngine, ids: list[int], max_tokens: int, penalty: float = 1.0) -> tuple[float, list[int]]:
    """(decode tokens/s, the new tokens)."""
    params = SamplingParams(max_tokens=max_tokens, repetition_penalty=penalty)
    engine.generate([ids], params)  # warm: the same shapes and cache
    seconds, out = timed(lambda: engine.generate([ids], params)[0])
    return (len(out.token_ids) - 1) / (seconds - out.ttft_s), out.token_ids


def hf_run(model, ids: list[int], max_tokens: int, speculate: dict | None, penalty: float = 1.0) -> float:
    """Decode tokens/s of transformers' generate (speculate: prompt_lookup_num_tokens, or
    assistant_model with num_assistant_tokens)."""
    x = torch.tensor([ids])
    kw = dict(do_sample=False, attention_mask=torch.ones_like(x), repetition_penalty=penalty) | (speculate or {})
    with torch.inference_mode():
        model.generate(x, max_new_tokens=max_tokens, **kw)
        first, _ = timed(lambda: model.generate(x, max_new_tokens=1, **kw))
        seconds, out = timed(lambda: model.generate(x, max_new_tokens=max_tokens, **kw))
    return (out.shape[1] - x.shape[1] - 1) / (seconds - first)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max_tokens", type=int, default=256)
    ap.add_argument("--no_hf", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    EngineConfig.add_cli_args(ap, dtype="bf16", max_batch_size=1, speculative="ngram", block_size=16)
    args = ap.parse_args(argv)
    k = args.num_speculative_tokens
    cfg = engine_config(args, max_input_length=1024, max_output_length=args.max_tokens, progress=False)
    plain = LLMEngine(EngineConfig(**(vars(cfg) | {"speculative": None, "draft_model": None})))
    spec = LLMEngine(cfg)
    hf = None if args.no_hf else load_hf(cfg.model_path, parse_dtype(cfg.dtype))
    how = f"lookup {k}" if cfg.speculative == "ngram" else f"draft {k}"
    hf_spec = {"prompt_lookup_num_tokens": k}
    if cfg.speculative == "draft" and hf is not None:  # transformers' assisted generation, the same draft
        hf_spec = {"assistant_model": load_hf(cfg.draft_model, parse_dtype(cfg.dtype))}
        hf_spec["assistant_model"].generation_config.num_assistant_tokens = k
        hf_spec["assistant_model"].generation_config.num_assistant_tokens_schedule = "constant"
    rows = []
    for name, text in workloads().items():
        ids = plain.encode(text, chat=True)
        penalty = PENALTY.get(name, 1.0)
        r_plain, out_plain = engine_run(plain, ids, args.max_tokens, penalty)
        before = spec.stats().speculation
        r_spec, out_spec = engine_run(spec, ids, args.max_tokens, penalty)
        after = spec.stats().speculation
        proposed, accepted, verified = ((a - b) / 2 for a, b in zip(after, before))  # two runs: warm, timed
        row = {
            "workload": name,
            "prompt tokens": len(ids),
            "new tokens": len(out_plain),
            "engine tokens/s": r_plain,
            f"engine + {how} tokens/s": r_spec,
            "speedup": r_spec / r_plain,
            "same text": out_plain == out_spec,
            "acceptance": accepted / proposed if proposed else 0.0,
            "tokens / verify": 1 + accepted / verified if verified else 1.0,
        }
        if hf is not None:
            r_hf_spec = hf_run(hf, ids, args.max_tokens, hf_spec, penalty)
            row["transformers tokens/s"] = hf_run(hf, ids, args.max_tokens, None, penalty)
            row[f"transformers + {how} tokens/s"] = r_hf_spec
            row["engine vs transformers, both speculating"] = r_spec / r_hf_spec
        rows.append(row)
        print(row, flush=True)
        gc.collect()
    columns = list(rows[0])
    text = (
        f"Model {Path(cfg.model_path).name}, {cfg.dtype}, batch 1, greedy, up to {args.max_tokens} new tokens, "
        + (
            f"prompt lookup of up to {k} tokens (n-gram up to {args.ngram_max})"
            if cfg.speculative == "ngram"
            else f"draft model {Path(cfg.draft_model).name} proposing {k} tokens"
        )
        + f", decode tokens/s, CPU: {cpu_name()}, "
        f"{torch.get_num_threads()} threads\n\n" + markdown_table(rows, columns) + "\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"speculative_{cfg.speculative}_k{k}.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
