"""Multi-LoRA: what serving adapters costs, and a real adapter's skill served beside the base.

    python -m benchmarks.bench_lora [-m WEIGHT_DIR] [--rank 16] [--adapters 4] [--batch 8] [--context 128]
        [--steps 16] [--train_steps 60]

speed: decode step time of one batch whose requests use `--adapters` different random adapters
(rank `--rank` on q/k/v/o/gate/up/down), against the same batch on the base model, in the same
engine (adapters loaded) and in an engine without adapters; the bytes each adapter takes.

skill: a LoRA trained here with peft (a few minutes on a CPU) to answer arithmetic questions in a
fixed JSON form, {"answer": N}; on held-out questions the engine serves base and adapter in one
batch, and the share of answers in that form (and right) is measured for each, next to
transformers + peft greedy on the same prompts (equal tokens expected in fp32).
Needs peft (pip install -e .[test]). Results: results/lora.md.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tqdm import tqdm

from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams
from benchmarks.common import cpu_name, decode_step_ms, engine_config, load_hf, markdown_table, random_prompts

HERE = Path(__file__).parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_adapter(base, out, targets=TARGETS, r=8, rslora=False, seed=0, alpha=16, b_std=0.5, dtype=torch.float32):
    """A PEFT LoRA adapter of the model at `base`, saved to `out`: random A, and B drawn from
    N(0, b_std) (peft's own init leaves B at 0: no change to the model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, b_std)
    peft_model.save_pretrained(str(out))
    return Path(out)


def speed(args, cfg: EngineConfig, work: Path) -> tuple[list[dict], str]:
    paths = {
        f"a{i}": str(random_adapter(cfg.model_path, work / f"a{i}", r=args.rank, seed=i, b_std=0.02))
        for i in tqdm(range(args.adapters), desc="Random adapters")
    }
    plain = LLMEngine(cfg)
    prompts = random_prompts(args.batch, args.context, plain.model_config.vocab_size)
    served = LLMEngine(EngineConfig(**{**cfg.__dict__, "lora_modules": paths}))
    mixed = [f"a{i % args.adapters}" for i in range(args.batch)]
    rows = []
    for _ in range(args.repeats):  # interleaved, so drift of the machine hits every case alike
        rows.append(
            {
                "base, engine without adapters": decode_step_ms(plain, prompts, args.steps),
                "base, engine with adapters": decode_step_ms(served, prompts, args.steps),
                f"{args.adapters} adapters mixed": decode_step_ms(served, prompts, args.steps, mixed),
            }
        )
    best = {k: min(r[k] for r in rows) for k in rows[0]}
    ref = best["base, engine without adapters"]
    table = [{"batch": name, "decode step ms (best of runs)": f"{ms:.1f}", "vs base": f"{ms / ref:.3f}"}
             for name, ms in best.items()]  # fmt: skip
    per_adapter = sum(m.lora.nbytes for m in served.model.modules() if getattr(m, "lora", None) is not None)
    per_adapter /= args.adapters
    note = (f"{args.adapters} adapters of rank {args.rank} on q/k/v/o/gate/up/down, batch {args.batch} "
            f"({args.batch // args.adapters} requests per adapter), context {args.context}, {args.steps} decode "
            f"steps, best of {args.repeats}; memory per adapter (stacked, {served.dtype}): "
            f"{per_adapter / 2**20:.2f} MiB")  # fmt: skip
    return table, note


def question(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randrange(10, 90), rng.randrange(10, 90)
    return f"What is {a} plus {b}?", a + b


def chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


def train_json_adapter(model_path: str, out: Path, steps: int, seed: int = 0) -> Path:
    """peft LoRA (rank 8, attention and MLP) trained to answer {"answer": N}, loss on the answer only."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = get_peft_model(load_hf(model_path, torch.float32), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    rng, end = random.Random(seed), tok.convert_tokens_to_ids("<|im_end|>")
    for _ in tqdm(range(steps), desc="Training the JSON adapter", unit="step"):
        batch = []
        for _ in range(8):
            q, a = question(rng)
            prompt = chat_ids(tok, q)
            answer = tok.encode(json.dumps({"answer": a}), add_special_tokens=False) + [end]
            batch.append((prompt + answer, [-100] * len(prompt) + answer))
        width = max(len(x) for x, _ in batch)
        ids = torch.tensor([x + [tok.pad_token_id or 0] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(out))
    return out


def in_form(text: str, want: int) -> tuple[bool, bool]:
    """(the answer is {"answer": N} JSON, and N is right)."""
    try:
        obj = json.loads(text.strip())
    except json.JSONDecodeError:
        return False, False
    ok = isinstance(obj, dict) and set(obj) == {"answer"}
    return ok, ok and obj["answer"] == want


def skill(args, cfg: EngineConfig, work: Path) -> tuple[list[dict], str]:
    from peft import PeftModel

    adapter = train_json_adapter(cfg.model_path, work / "json", args.train_steps)
    engine = LLMEngine(EngineConfig(**{**cfg.__dict__, "lora_modules": {"json": str(adapter)}}))
    rng = random.Random(12345)  # held out: another stream of questions
    held = [question(rng) for _ in range(args.held_out)]
    prompts = [chat_ids(engine.tokenizer, q) for q, _ in held]
    params = SamplingParams(max_tokens=16)
    outs = engine.generate(prompts * 2, params, adapters=[None] * len(prompts) + ["json"] * len(prompts))
    base_out, lora_out = outs[: len(prompts)], outs[len(prompts) :]
    hf = PeftModel.from_pretrained(load_hf(cfg.model_path, torch.float32), str(adapter)).eval()
    same = 0
    with torch.no_grad():
        for p, o in zip(prompts[: args.compare], lora_out):
            x = torch.tensor([p])
            gen = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False)
            same += gen[0, len(p) :].tolist()[: len(o.token_ids)] == o.token_ids
    rows = []
    for name, got in (("base", base_out), ("json adapter", lora_out)):
        marks = [in_form(o.text, want) for o, (_, want) in zip(got, held)]
        form, right = sum(f for f, _ in marks), sum(r for _, r in marks)
        rows.append({"model": name, "answers in the JSON form": f"{form}/{len(marks)}",
                     "and right": f"{right}/{len(marks)}", "example": repr(got[0].text)})  # fmt: skip
    note = (f"adapter trained {args.train_steps} steps (batch 8, rank 8, lr 1e-3) on this CPU; {args.held_out} "
            f"held-out questions, base and adapter in one batch; engine = transformers + peft greedy on "
            f"{same}/{min(args.compare, len(prompts))} of them")  # fmt: skip
    return rows, note


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train_steps", type=int, default=60)
    ap.add_argument("--held_out", type=int, default=32)
    ap.add_argument("--compare", type=int, default=8, help="held-out prompts also run through transformers + peft")
    ap.add_argument("--work", type=Path, default=Path("/tmp/atb_llm_bench_lora"))
    ap.add_argument("--out", type=Path, default=HERE / "results")
    EngineConfig.add_cli_args(ap, block_size=16, max_batch_size=64, dtype="fp32")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    cfg = engine_config(args, max_input_length=max(args.context, 64), max_output_length=args.steps + 16,
                        progress=False)  # fmt: skip
    speed_rows, speed_note = speed(args, cfg, args.work)
    skill_rows, skill_note = skill(args, cfg, args.work)
    text = (
        f"Model {Path(cfg.model_path).name}, {cfg.dtype}, CPU: {cpu_name()}, torch {torch.__version__}\n\n"
        f"## Decode step with adapters\n\n{speed_note}\n\n"
        + markdown_table(speed_rows, list(speed_rows[0]))
        + f"\n\n## A trained adapter's skill, served beside the base\n\n{skill_note}\n\n"
        + markdown_table(skill_rows, list(skill_rows[0]))
        + "\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
