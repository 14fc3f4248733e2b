"""What quantizing the LM head at load (--quantize_lm_head) costs in accuracy: teacher-forced
GPL-3 (/usr/share/common-licenses/GPL-3) in segments, the same weights with the head in float,
int8 per vocabulary row (w8a16) and int4 per group of 128 (w4a16); per head, the perplexity, the
share of positions whose most likely token is the float head's, and the mean change of the text
token's log-probability.

    python -m benchmarks.lm_head_quant [--model DIR] [--segments 4] [--segment 1024] [--dtype bf16]

Prints a Markdown table and writes results/lm_head_quant.md.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from tqdm import tqdm
from transformers import AutoTokenizer

from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams
from atb_llm.utils.default_model import resolve_model_path
from benchmarks.common import cpu_name, markdown_table

HERE = Path(__file__).parent
GPL = Path("/usr/share/common-licenses/GPL-3")


def scored(model: str, head: str | None, segs: list[list[int]], dtype: str) -> list[tuple[float, int]]:
    """(log-probability of the text's token, most likely token) at every position after the first."""
    cfg = EngineConfig(model, dtype=dtype, max_batch_size=1, max_input_length=len(segs[0]), max_output_length=1,
                       quantize_lm_head=head, progress=False)  # fmt: skip
    engine = LLMEngine(cfg)
    out = []
    for seg in tqdm(segs, desc=f"head {head or 'float'}", leave=False):
        (res,) = engine.generate([seg], SamplingParams(max_tokens=1, prompt_logprobs=1))
        out += [(t.logprob, t.top[0][0]) for t in res.prompt_logprobs[1:]]
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="weight folder (default: the default model); any format")
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--segment", type=int, default=1024)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    model = str(resolve_model_path(args.model))
    ids = AutoTokenizer.from_pretrained(model).encode(GPL.read_text())
    segs = [ids[i : i + args.segment] for i in range(0, len(ids) - args.segment + 1, args.segment)][: args.segments]
    base = scored(model, None, segs, args.dtype)
    rows = []
    for head in (None, "w8a16", "w4a16"):
        got = base if head is None else scored(model, head, segs, args.dtype)
        rows.append({
            "LM head": head or "float",
            "perplexity": math.exp(-sum(lp for lp, _ in got) / len(got)),
            "same most likely token": f"{sum(a[1] == b[1] for a, b in zip(got, base)) / len(got):.2%}",
            "mean abs. change of log p": sum(abs(a[0] - b[0]) for a, b in zip(got, base)) / len(got),
        })  # fmt: skip
    head = (f"{Path(model).name}, {args.dtype}, GPL-3: {len(segs)} segments of {args.segment} tokens "
            f"({len(base)} positions), CPU: {cpu_name()}\n\n")  # fmt: skip
    table = head + markdown_table(rows, list(rows[0]))
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lm_head_quant.md").write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
