"""Generate with the paged-attention engine, with MindIE run_pa's options.

python -m examples.run_pa --model_path DIR --input_texts "What is deep learning?" --is_chat_model
(or python -m atb_llm.entrypoints.run_pa ...)
torchrun --nproc_per_node N -m examples.run_pa --model_path DIR ...   (tensor parallel, N ranks)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from atb_llm.compression.layout import GroupLayout
from atb_llm.compression.memory import kv_bytes
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams
from atb_llm.utils.cli import run_main
from atb_llm.utils.default_model import resolve_model_path
from atb_llm.utils.distributed import init_tensor_parallel, is_main_rank, leave_tensor_parallel


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Qwen2.5 paged-attention inference (MindIE run_pa options)")
    p.add_argument("--input_texts", nargs="+", default=["What's deep learning?"], help="one or more prompts")
    p.add_argument(
        "--input_file",
        default=None,
        help="prompts: .txt (one per line) or .jsonl (a string, {'prompt': ...}, {'messages': [...]} "
        "or a list of chat messages per line)",
    )
    p.add_argument(
        "--input_dict",
        default=None,
        help='JSON list of requests with their LoRA adapters: \'[{"prompt": "...", "adapter": "qwen_lora1"}, '
        '{"prompt": "..."}]\' (no adapter, or "base": the base model)',
    )
    p.add_argument("--is_chat_model", action="store_true", help="apply the model's chat template")
    p.add_argument("--ignore_eos", action="store_true", help="always generate max_output_length tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    EngineConfig.add_cli_args(p, max_output_length=128)
    return p.parse_args(argv)


def read_input_dict(text: str) -> tuple[list[str], list[str | None]]:
    """--input_dict: the prompts and each one's adapter (None: the base model)."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f'--input_dict is not JSON ({e}); write \'[{{"prompt": "...", "adapter": "..."}}]\'') from None
    if not isinstance(items, list) or not items:
        raise ValueError('--input_dict must be a non-empty JSON list of {"prompt": ..., "adapter": ...}')
    prompts, adapters = [], []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"]:
            raise ValueError(f"--input_dict item {i} = {item!r} needs a non-empty string 'prompt'")
        adapter = item.get("adapter")
        if adapter is not None and not isinstance(adapter, str):
            raise ValueError(f"--input_dict item {i}: adapter={adapter!r} must be an adapter's name")
        prompts.append(item["prompt"])
        adapters.append(adapter)
    return prompts, adapters


def read_prompts(args: argparse.Namespace) -> list[str | list[dict]]:
    """Prompts as strings, or chat message lists (from a jsonl file)."""
    if args.input_dict:
        return read_input_dict(args.input_dict)[0]
    if not args.input_file:
        return list(args.input_texts)
    path = Path(args.input_file)
    if not path.is_file():
        raise FileNotFoundError(f"--input_file {path} does not exist")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for i, line in enumerate(lines, 1):
        item = json.loads(line)
        if isinstance(item, dict):
            item = item.get("messages") or item.get("prompt")
        if not isinstance(item, (str, list)) or not item:
            raise ValueError(
                f"{path}:{i}: expected a string, a list of messages, or an object with 'prompt' or 'messages'"
            )
        prompts.append(item)
    return prompts


def encode(engine: LLMEngine, prompt: str | list[dict], chat: bool) -> list[int]:
    if isinstance(prompt, list):  # chat messages
        return engine.tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    return engine.encode(prompt, chat=chat)


def kv_report(engine: LLMEngine, outputs: list) -> str:
    """KV bytes the compressed cache held per request against an uncompressed one, and peak blocks per level."""
    cfg, bs = engine.model_config, engine.cfg.block_size
    full = GroupLayout.uniform(cfg.num_hidden_layers, cfg.num_key_value_heads)
    lines = ["\nMLGC KV cache (whole blocks):"]
    for i, out in enumerate(outputs):
        n = len(out.prompt_token_ids) + len(out.token_ids)
        got, ref = (kv_bytes(lay, n, cfg.head_dim, engine.dtype, bs) for lay in (engine.layout, full))
        lines.append(
            f"  request {i}: {n} tokens, {got / 2**20:.2f} MiB vs {ref / 2**20:.2f} MiB uncompressed ({got / ref:.0%})"
        )
    for name, u in engine.cache_manager.usage_by_level().items():
        lines.append(
            f"  {name}: {u['groups']} groups, peak {u['blocks_peak']} blocks ({u['bytes_peak'] / 2**20:.2f} MiB)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list:
    args = parse_args(argv)
    prompts = read_prompts(args)
    params = SamplingParams(
        max_tokens=args.max_output_length,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    device = init_tensor_parallel(args.device)  # torchrun: join its world; this rank's device
    cfg = EngineConfig.from_cli_args(args, model_path=str(resolve_model_path(args.model_path)), device=device)
    cfg.progress = cfg.progress and is_main_rank()
    engine = LLMEngine(cfg)
    engine.warmup()
    token_ids = [encode(engine, p, args.is_chat_model) for p in prompts]
    start = time.perf_counter()
    adapters = read_input_dict(args.input_dict)[1] if args.input_dict else None
    outputs = engine.generate(token_ids, params, use_tqdm=len(prompts) > 1 and is_main_rank(), adapters=adapters)
    elapsed = time.perf_counter() - start
    if not is_main_rank():  # rank 0 prints; the others computed their shares of every step
        leave_tensor_parallel()
        return outputs
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        n = len(out.token_ids)
        ttft = (out.ttft_s or 0) * 1000
        tpot = (out.tpot_s or 0) * 1000
        rate = f"{1 / out.tpot_s:.2f} tokens/s" if out.tpot_s else "n/a tokens/s"
        print(f"\nQuestion[{i}]: {prompt if isinstance(prompt, str) else prompt[-1]['content']}")
        if adapters is not None:
            print(f"Adapter[{i}]: {adapters[i] or 'base'}")
        print(f"Answer[{i}]: {out.text}")
        print(
            f"Generate[{i}]: {n} tokens, first token {ttft:.1f} ms, mean per output token {tpot:.1f} ms, "
            f"{rate} (decode), finish_reason={out.finish_reason}"
        )
    if args.mlgc != "off":
        print(kv_report(engine, outputs))
    total = sum(len(o.token_ids) for o in outputs)
    print(
        f"\n{len(outputs)} request(s), {total} output tokens in {elapsed:.2f} s: {total / elapsed:.2f} tokens/s "
        f"end to end (max_batch_size={args.max_batch_size}, dtype={engine.dtype}, mlgc={args.mlgc}, "
        f"world size {engine.tp.world})"
    )
    stats = engine.stats()
    if stats.speculation is not None:
        proposed, accepted, verified = stats.speculation
        rate = f"{stats.acceptance_rate:.1%}" if proposed else "n/a"
        mean = f"{stats.mean_accepted:.2f}" if verified else "n/a"
        print(
            f"speculative ({args.speculative}, up to {args.num_speculative_tokens} a step): {accepted} of {proposed} "
            f"proposed tokens accepted ({rate}), {mean} tokens per verify step on average"
        )
    leave_tensor_parallel()
    return outputs


def cli() -> None:
    """The command: an error of the user's making ends it with a message, not a traceback."""
    run_main(main, "run_pa")


if __name__ == "__main__":
    cli()
