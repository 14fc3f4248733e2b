"""Multi-LoRA: PEFT adapters served beside the base model, mixed in one batch.

Adapters are made here with peft on the tiny model (random non-zero B, so they change the output);
the reference is transformers + peft in fp32."""

import json
import re
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from tiny import make_adapter
from transformers import AutoModelForCausalLM

from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.request_limits import RequestError
from atb_llm.runtime.sequence import SamplingParams

PROMPTS = [[5, 9, 33, 2, 71, 18, 4, 60, 7], list(range(40, 75)), [200, 3, 3, 150, 90]]


def peft_reference(base, adapter, prompts, max_new):
    """Greedy tokens and prompt log-probabilities of transformers + peft (adapter None: the base)."""
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    tokens, prompt_lps = [], []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            gen = model.generate(x, max_new_tokens=max_new, do_sample=False, attention_mask=torch.ones_like(x))
            tokens.append(gen[0, len(ids) :].tolist())
            lp = model(x).logits[0, :-1].float().log_softmax(-1)
            prompt_lps.append(lp.gather(1, x[0, 1:, None])[:, 0].tolist())
    return tokens, prompt_lps


def engine_of(base, **kw):
    cfg = dict(block_size=16, max_input_length=64, max_output_length=16, progress=False, dtype="fp32") | kw
    return LLMEngine(EngineConfig(str(base), **cfg))


def outputs(engine, prompts, adapters, max_new=12, prompt_logprobs=None):
    sp = SamplingParams(max_tokens=max_new, prompt_logprobs=prompt_logprobs)
    return engine.generate(prompts, sp, adapters=adapters)


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {
        "all8": make_adapter(tiny, root / "all8", seed=1),
        "attn64_rs": make_adapter(tiny, root / "attn64_rs", ["q_proj", "v_proj", "o_proj"], r=64, rslora=True, seed=2),
        "mlp16": make_adapter(tiny, root / "mlp16", ["gate_proj", "up_proj", "down_proj", "k_proj"], r=16, seed=3),
    }


@pytest.mark.slow  # transformers + peft references, or a whole run_pa
def test_each_adapter_equals_transformers_and_peft(tiny, adapters):
    engine = engine_of(tiny, lora_modules={k: str(v) for k, v in adapters.items()})
    for name in [None, *adapters]:
        want_tokens, want_lps = peft_reference(tiny, adapters.get(name), PROMPTS, 12)
        outs = outputs(engine, PROMPTS, [name] * len(PROMPTS), prompt_logprobs=0)
        for out, tokens, lps in zip(outs, want_tokens, want_lps):
            assert out.token_ids == tokens, name
            got = [p.logprob for p in out.prompt_logprobs[1:]]
            assert got == pytest.approx(lps, abs=2e-4), name
    base_tokens = peft_reference(tiny, None, PROMPTS, 12)[0]
    assert all(peft_reference(tiny, a, PROMPTS, 12)[0] != base_tokens for a in adapters.values())  # they matter


def test_a_mixed_batch_gives_each_request_its_own_output(tiny, adapters):
    """Base and two adapters in one batch (with n > 1 siblings and a prompt shared across adapters
    under prefix caching): each request gets exactly what it gets alone."""
    mods = {k: str(v) for k, v in adapters.items()}
    shared = list(range(100, 140))  # 40 tokens: two whole blocks the prefix cache could share
    prompts = [shared + [7, 8], shared + [7, 8], shared + [7, 8], PROMPTS[0], PROMPTS[1]]
    names = [None, "all8", "attn64_rs", "all8", "mlp16"]
    alone = []
    for p, a in zip(prompts, names):
        engine = engine_of(tiny, lora_modules=mods)
        alone.append(outputs(engine, [p], [a])[0].token_ids)
    assert len({tuple(t) for t in alone[:3]}) == 3  # the shared prompt answers differently per adapter
    engine = engine_of(tiny, lora_modules=mods, prefix_caching=True, max_batch_size=8)
    for hits in (0, 3 * 32):  # the second round finds the first's blocks cached, each under its adapter
        mixed = outputs(engine, prompts, names)
        assert [o.token_ids for o in mixed] == alone
        assert engine.stats().prefix[1] >= hits  # tokens found in the cache, since start
    # n > 1: siblings of an adapter's request share its prompt's cache, and its adapter
    sp = SamplingParams(max_tokens=12, temperature=0.8, seed=3)
    first = engine.add_request(PROMPTS[1], sp, request_id="a", adapter="mlp16")
    engine.add_request(PROMPTS[1], SamplingParams(max_tokens=12), request_id="b", sibling_of="a", adapter="mlp16")
    while engine.has_unfinished():
        engine.step()
    assert engine.output(first).token_ids and first.adapter == engine.adapters["mlp16"]
    with pytest.raises(RequestError, match="same prompt and adapter"):
        engine.add_request(PROMPTS[1], sp, request_id="c")
        engine.add_request(PROMPTS[1], sp, request_id="d", sibling_of="c", adapter="all8")


def test_base_only_batches_pay_nothing(tiny, adapters):
    engine = engine_of(tiny, lora_modules={"all8": str(adapters["all8"])})
    plain = engine_of(tiny)
    assert [o.token_ids for o in outputs(engine, PROMPTS, None)] == [o.token_ids for o in outputs(plain, PROMPTS, None)]
    batches = []
    original = engine.model.set_lora
    engine.model.set_lora = lambda b: (batches.append(b), original(b))
    outputs(engine, PROMPTS, None)
    assert batches and all(b is None for b in batches)


def test_lora_adapter_json_in_the_weight_folder(tiny, adapters, tmp_path):
    base = shutil.copytree(tiny, tmp_path / "base")
    (base / "lora_adapter.json").write_text(json.dumps({"qwen_lora1": str(adapters["all8"])}))
    engine = engine_of(base, lora_modules={"qwen_lora2": str(adapters["mlp16"])})
    assert engine.adapters == {"base": 0, "qwen_lora1": 1, "qwen_lora2": 2}
    with pytest.raises(RequestError, match=r"adapter 'nope' is not loaded; this engine serves \['base', 'qwen_lora1'"):
        engine.add_request(PROMPTS[0], SamplingParams(max_tokens=4), adapter="nope")


def test_bad_adapters_are_clear_errors(tiny, adapters, tmp_path, tiny_models):
    def copy(name):
        return shutil.copytree(adapters["all8"], tmp_path / name)

    def first(t):
        return next(k for k in t if "lora_A" in k)

    def retarget(t):  # one A/B pair moved onto a module that is not a linear of the base model
        a = first(t)
        module = a.removesuffix(".lora_A.weight")
        moved = re.sub(r"self_attn\.\w+_proj|mlp\.\w+_proj", "embed_tokens", module)
        moved = moved.replace("layers.0.embed_tokens", "embed_tokens")
        return {k: v for k, v in t.items() if module not in k} | {
            f"{moved}.lora_A.weight": t[a],
            f"{moved}.lora_B.weight": t[f"{module}.lora_B.weight"],
        }

    def tensors_of(folder, edit):
        path = folder / "adapter_model.safetensors"
        if edit is None:
            path.unlink()
        else:
            save_file(edit(load_file(str(path))), str(path))
        return folder

    def config_of(folder, **changes):
        path = folder / "adapter_config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | changes))
        return folder

    cases = [
        ({"x": str(tmp_path / "missing")}, r"LoRA adapter 'x': .*missing/adapter_config.json does not exist"),
        ({"base": str(adapters["all8"])}, r"'base' cannot name an adapter"),
        ({"d": str(config_of(copy("dora"), use_dora=True))}, r"LoRA adapter 'd': use_dora=True: DoRA"),
        ({"m": str(config_of(copy("mts"), modules_to_save=["lm_head"]))}, r"modules_to_save=\['lm_head'\]"),
        ({"p": str(config_of(copy("pt"), peft_type="PREFIX_TUNING"))}, r"only LORA adapters"),
        ({"r": str(config_of(copy("rank"), r=4))}, r"do not have rank r=4"),
        ({"b": str(config_of(copy("bias"), bias="all"))}, r"bias='all': adapters with biases are not supported"),
        ({"z": str(config_of(copy("zero"), r=0))}, r"r=0 must be at least 1"),
        ({"n": str(tensors_of(copy("nofile"), None))}, r"has no adapter_model.safetensors; save it with safe_"),
        ({"e": str(tensors_of(copy("empty"), lambda t: {}))}, r"holds no LoRA weights"),
        (
            {"k": str(tensors_of(copy("key"), lambda t: t | {"base_model.model.lm_head.weight": t[first(t)].clone()}))},
            r"tensor base_model.model.lm_head.weight is not a LoRA A/B weight",
        ),  # fmt: skip
        (
            {"h": str(tensors_of(copy("half"), lambda t: {k: v for k, v in t.items() if "lora_B" not in k}))},
            r"has lora_A without its pair",
        ),  # fmt: skip
        ({"t": str(tensors_of(copy("target"), retarget))}, r"targets .*embed_tokens, not an adaptable linear"),
    ]
    for mods, message in cases:
        with pytest.raises(ValueError, match=message):
            engine_of(tiny, lora_modules=mods)
    other = tiny_models(hidden=48)  # a base model of other shapes
    with pytest.raises(ValueError, match=r"LoRA adapter 'w': .* do not fit .* it was made for another base model"):
        engine_of(other, lora_modules={"w": str(adapters["all8"])})
    with pytest.raises(ValueError, match=r"11 LoRA adapters asked for; at most 10"):
        engine_of(tiny, lora_modules={f"a{i}": str(adapters["all8"]) for i in range(11)})
    with pytest.raises(ValueError, match=r"--lora_modules 'oops' is not NAME=PATH"):
        EngineConfig(str(tiny), lora_modules=["oops"])


@pytest.mark.slow  # transformers + peft references, or a whole run_pa
def test_run_pa_input_dict_names_each_requests_adapter(tiny, adapters, capsys):
    from atb_llm.entrypoints import run_pa

    requests = [{"prompt": "hello world", "adapter": "l1"}, {"prompt": "hello world"}, {"prompt": "the fox"}]
    argv = ["--model_path", str(tiny), "--lora_modules", f"l1={adapters['all8']}", "--max_output_length", "8",
            "--block_size", "16", "--max_input_length", "32", "--input_dict", json.dumps(requests)]  # fmt: skip
    outs = run_pa.main(argv)
    printed = capsys.readouterr().out
    assert "Adapter[0]: l1" in printed and "Adapter[1]: base" in printed
    engine = engine_of(tiny, lora_modules={"l1": str(adapters["all8"])})
    ids = [engine.encode(r["prompt"]) for r in requests]
    want = engine.generate(ids, SamplingParams(max_tokens=8), adapters=["l1", None, None])
    assert [o.token_ids for o in outs] == [o.token_ids for o in want] and outs[0].token_ids != outs[1].token_ids
    for bad, message in [("[{}]", "item 0 = {} needs a non-empty string 'prompt'"), ("{", "--input_dict is not JSON"),
                         ('[{"prompt": "x", "adapter": 3}]', "adapter=3 must be an adapter's name")]:  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message)):
            run_pa.main([*argv[:-1], bad])


@pytest.mark.slow  # transformers + peft references, or a whole run_pa
def test_prompts_longer_than_the_mlp_chunk_keep_their_adapters(tiny, adapters):
    """A prefill of 300 + 290 rows runs the MLP in chunks of 256: each chunk's rows keep their own
    adapter (the second prompt's rows straddle the chunk boundaries)."""
    long = [[(7 * i + 3) % 290 + 3 for i in range(300)], [(5 * i + 1) % 280 + 4 for i in range(290)]]
    names = ["all8", "mlp16"]
    engine = engine_of(tiny, lora_modules={k: str(v) for k, v in adapters.items()}, max_input_length=320)
    outs = outputs(engine, long, names, max_new=4, prompt_logprobs=0)
    for ids, name, out in zip(long, names, outs):
        tokens, lps = peft_reference(tiny, adapters[name], [ids], 4)
        assert out.token_ids == tokens[0]
        assert [p.logprob for p in out.prompt_logprobs[1:]] == pytest.approx(lps[0], abs=2e-4)


def test_the_default_model_with_an_adapter_equals_transformers_and_peft(default_model, tmp_path):
    from benchmarks.bench_lora import random_adapter

    lora = random_adapter(default_model, tmp_path / "lora", r=16, seed=5, b_std=0.02)
    engine = engine_of(default_model, lora_modules={"l": str(lora)}, max_input_length=32)
    prompts = [engine.encode("def quicksort(arr):\n"), engine.encode("The capital of France is")]
    outs = outputs(engine, prompts * 2, ["l", "l", None, None], max_new=8, prompt_logprobs=0)
    want_tokens, want_lps = peft_reference(default_model, lora, prompts, 8)
    for out, tokens, lps in zip(outs[:2], want_tokens, want_lps):
        assert out.token_ids == tokens
        assert [p.logprob for p in out.prompt_logprobs[1:]] == pytest.approx(lps, abs=1e-3)
    assert [o.token_ids for o in outs[:2]] != [o.token_ids for o in outs[2:]]  # the adapter changes the answers
