"""RULER-style long-context accuracy of MLGC plans: synthetic tasks generated from a seed.

    python -m benchmarks.ruler [-m WEIGHT_DIR] [--lengths 4096 8192 16384 32768]
        [--samples 50] [--tasks ...] [--caches ...] [--dtype fp32] [--chunk 2048] [--out DIR]

Tasks (after RULER, Hsieh et al. 2024), in a haystack of filler sentences of the asked length:
- niah_single: one needle "The special magic number for KEY is: N." at a random depth; answer N.
- niah_multikey: four needles with different keys; answer the number of one of them.
- niah_multivalue: four numbers for the same key; answer all four (score: the share found).
- vt (variable tracking): VAR A = N, then VAR B = VAR A, ... five links spread over the text; name
  every variable holding N (score: the share named).
- cwe (common word extraction): a numbered word list where 10 words come 30 times (fewer below 3K
  tokens) and the others 3 times; name the 10 most common (score: the share named).

Caches: the full cache, MLGC plans calibrated at full ratio 0.25 and 0.5 (and their int8 variant
with --int8), streaming (every group a window) and random (the 0.25 budget on random groups).
Greedy, chat template. `--chunk N` prefills in chunks of N tokens (chunked prefill), where window
groups also compress what later chunks see; without it every head attends over the whole prompt
in prefill. Writes results/ruler.md and results/ruler.png; rows done so far are kept in
results/ruler_rows.json, so a stopped run resumes.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tqdm import tqdm

from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams
from atb_llm.utils.default_model import resolve_model_path
from benchmarks.bench_accuracy import FILLER, plans
from benchmarks.common import engine_config, markdown_table

HERE = Path(__file__).parent
TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe")
MAX_NEW = {"niah_single": 24, "niah_multikey": 24, "niah_multivalue": 64, "vt": 48, "cwe": 96}
INTRO = "Some special magic numbers are hidden inside the following text. Memorize them.\n"


def word(rng: random.Random) -> str:
    """A pronounceable made-up word: no overlap with anything the model knows."""
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4)))


def number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


class Haystack:
    """Filler text of a token budget, with sentences placed at depths in [0, 1]."""

    def __init__(self, tokenizer, length: int):
        self.per_filler = len(tokenizer.encode(FILLER))
        self.length = length

    def build(self, inserts: list[tuple[float, str]], reserve: int) -> str:
        n = max(1, (self.length - reserve) // self.per_filler)
        at = sorted((int(n * d), s) for d, s in inserts)
        parts, last = [], 0
        for pos, sentence in at:
            parts.append(FILLER * (pos - last) + sentence + " ")
            last = pos
        parts.append(FILLER * (n - last))
        return "".join(parts)


def make_sample(task: str, hay: Haystack, rng: random.Random) -> tuple[str, list[str]]:
    """(prompt text, the strings a right answer contains)."""
    if task == "niah_single":
        key, value = word(rng), number(rng)
        text = hay.build([(rng.random(), f"The special magic number for {key} is: {value}.")], 120)
        return INTRO + text + f"\nWhat is the special magic number for {key} mentioned in the text?", [value]
    if task == "niah_multikey":
        keys = [word(rng) for _ in range(4)]
        values = [number(rng) for _ in keys]
        needles = [(rng.random(), f"The special magic number for {k} is: {v}.") for k, v in zip(keys, values)]
        i = rng.randrange(4)
        return INTRO + hay.build(needles, 180) + f"\nWhat is the special magic number for {keys[i]}?", [values[i]]
    if task == "niah_multivalue":
        key, values = word(rng), [number(rng) for _ in range(4)]
        needles = [(rng.random(), f"One of the special magic numbers for {key} is: {v}.") for v in values]
        question = f"\nWhat are all the special magic numbers for {key} mentioned in the text? List all four."
        return INTRO + hay.build(needles, 200) + question, values
    if task == "vt":
        value, names = str(rng.randrange(10000, 100000)), [word(rng).upper() for _ in range(5)]
        links = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        inserts = [(i / 5 + rng.random() / 5, s) for i, s in enumerate(links)]
        intro = "Memorize and track the chains of variable assignments hidden in the following text.\n"
        question = f"\nFind all variables that are assigned the value {value} in the text above, directly or not."
        return intro + hay.build(inserts, 200) + question, names
    if task == "cwe":
        entries = hay.length // 5  # about 5 tokens an entry ("123. word "); `fit` trims what is over
        freq = max(5, min(30, entries // 20))  # RULER: 30 for each common word, 3 for the others
        common = [word(rng) for _ in range(10)]
        rare = [word(rng) for _ in range(max(10, (entries - 10 * freq) // 3))]
        words = [w for w in common for _ in range(freq)] + [w for w in rare for _ in range(3)]
        rng.shuffle(words)
        listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        question = "\nWhat are the 10 most common words in the above list? Answer with the 10 words."
        return "Below is a numbered list of words.\n" + listing + question, common
    raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")


def fit(engine: LLMEngine, task: str, length: int, rng: random.Random) -> tuple[list[int], list[str]]:
    """A sample whose chat prompt has at most `length` tokens (cwe's list is cut to fit)."""
    hay = Haystack(engine.tokenizer, length)
    text, answers = make_sample(task, hay, rng)
    ids = engine.encode(text, chat=True)
    while task == "cwe" and len(ids) > length:  # drop rare words from the end of the list
        head, _, question = text.rpartition("\n")
        text = head[: int(len(head) * length / len(ids) * 0.98)].rsplit(" ", 2)[0] + "\n" + question
        ids = engine.encode(text, chat=True)
    return ids, answers


def score(text: str, answers: list[str]) -> float:
    return sum(a.lower() in text.lower() for a in answers) / len(answers)


def run(engine: LLMEngine, task: str, length: int, samples: int, seed: int) -> float:
    rng = random.Random(f"{task}/{length}/{seed}")
    items = [fit(engine, task, length, rng) for _ in range(samples)]
    outs = engine.generate([ids for ids, _ in items], SamplingParams(max_tokens=MAX_NEW[task]))
    return sum(score(o.text, answers) for o, (_, answers) in zip(outs, items)) / samples


def plot(rows: list[dict], lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        ax.plot(
            [n // 1024 for n in lengths], [row[f"avg {n // 1024}K"] for n in lengths], marker="o", label=row["cache"]
        )
    ax.set_xlabel("context (K tokens)")
    ax.set_ylabel("RULER-style score, mean of tasks")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384, 32768])
    ap.add_argument("--samples", type=int, default=50, help="per task and length")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--caches", nargs="*", default=None, help="only these caches, by name (default: all)")
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5])
    ap.add_argument("--int8", action="store_true", help="also each calibrated plan in int8")
    ap.add_argument("--chunk", type=int, default=None, help="chunked prefill of this many tokens")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--recent", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    EngineConfig.add_cli_args(ap)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model = str(resolve_model_path(args.model_path))
    caches = {name: p.to_layout() if p else None for name, p in plans(
        model, args.out, args.block_size, args.sink, args.recent, args.ratios, None
    ).items()}  # fmt: skip
    if args.int8:
        caches |= {f"{n} int8": lay.as_int8() for n, lay in list(caches.items()) if n.startswith("MLGC")}
    if args.caches:
        caches = {n: lay for n, lay in caches.items() if n in args.caches}
    done_path = args.out / "ruler_rows.json"
    done = json.loads(done_path.read_text()) if done_path.is_file() else {}
    rows = []
    for name, layout in tqdm(caches.items(), desc="Caches"):
        cfg = engine_config(
            args, max_batch_size=4, max_input_length=max(args.lengths), max_output_length=128,
            chunked_prefill=args.chunk is not None, max_prefill_tokens=args.chunk or max(args.lengths), progress=False,
        )  # fmt: skip
        engine = None
        row = {"cache": name}
        for n in args.lengths:
            for task in args.tasks:
                key = f"{name}|{task}|{n}|{args.samples}|{args.seed}|{args.chunk}|{args.dtype}"
                if key not in done:
                    engine = engine or LLMEngine(cfg, layout=layout)
                    done[key] = run(engine, task, n, args.samples, args.seed)
                    done_path.write_text(json.dumps(done, indent=1))
                row[f"{task} {n // 1024}K"] = done[key]
            row[f"avg {n // 1024}K"] = sum(row[f"{t} {n // 1024}K"] for t in args.tasks) / len(args.tasks)
        rows.append(row)
        del engine
    columns = ["cache"] + [f"avg {n // 1024}K" for n in args.lengths]
    columns += [f"{t} {n // 1024}K" for n in args.lengths for t in args.tasks]
    head = (
        f"{args.samples} samples per task and length, seed {args.seed}, greedy; sink={args.sink}, "
        f"recent={args.recent} (aligned), block_size={args.block_size}, dtype {args.dtype or 'of the checkpoint'}, "
        f"{'chunked prefill of ' + str(args.chunk) + ' tokens' if args.chunk else 'one-piece prefill'}\n\n"
    )
    text = head + markdown_table(rows, columns) + "\n"
    (args.out / "ruler.md").write_text(text)
    plot(rows, args.lengths, args.out / "ruler.png")
    print(text)
    return text


if __name__ == "__main__":
    main()
