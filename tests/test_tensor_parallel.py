"""Tensor parallelism: two gloo ranks under torchrun (one thread each) give world size 1's greedy
tokens and prompt log-probabilities, with each rank holding about half the weights and KV bytes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from atb_llm.compression.levels import FullInt8, Level, Window, WindowInt8
from atb_llm.compression.plan import MlgcPlan
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams

WORKER = Path(__file__).parent / "tp_worker.py"
PROMPTS = [[5, 9, 33, 2, 71, 18, 4, 60, 7], list(range(40, 75)), [200, 3, 3, 150, 90] * 8]
ENGINE = dict(block_size=16, max_input_length=64, max_output_length=12, progress=False, dtype="fp32")


def torchrun(tmp_path, spec: dict, world: int = 2) -> tuple[list[dict], subprocess.CompletedProcess]:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), str(WORKER), str(out),
           json.dumps(spec)]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # two ranks on two cores, one thread each
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(world) if Path(f"{out}.rank{r}").exists()]
    return ranks, done


def single(spec: dict) -> tuple[list, list, int, int, int]:
    layout = MlgcPlan.load(spec["plan"]).to_layout() if spec.get("plan") else None
    engine = LLMEngine(EngineConfig(**spec["engine"]), layout=layout)
    outs = engine.generate(spec["prompts"], [SamplingParams(**p) for p in spec["params"]])
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    kv = engine.cache_manager.total_bytes
    lps = [[p.logprob for p in o.prompt_logprobs[1:]] for o in outs]
    whole = sum(p.numel() * p.element_size() for n, p in engine.model.named_parameters() if "embed" in n or "norm" in n)
    return [o.token_ids for o in outs], lps, weights, kv, whole


def spec_of(model, **engine):
    params = [dict(max_tokens=12, prompt_logprobs=0, ignore_eos=True)] * len(PROMPTS)
    return {"engine": {"model_path": str(model)} | ENGINE | engine, "prompts": PROMPTS, "params": params}


def mixed_plan(model: Path, path: Path) -> Path:
    """A plan with every level, spread so that each rank holds several."""
    from atb_llm.compression.plan import plan_from_levels
    from atb_llm.models.base.router import get_router

    config = get_router(model).get_config()
    kinds = [Level(), Window(sink=4, recent=11), FullInt8(), WindowInt8(sink=4, recent=11)]
    h = config.num_key_value_heads
    chosen = [kinds[(g // h + g % h) % 4] for g in range(config.num_groups)]
    return plan_from_levels(config, chosen, 16, 4, 11, "test", None).save(path)


def check(ranks, done, want_tokens, want_lps, weights, kv, replicated_weights):
    """Rank 0's = world size 1's; each rank holds half of the sharded weights plus the whole
    embedding and norms (`replicated_weights`), and half the KV bytes."""
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(ranks) == 2 and ranks[0]["tokens"] == ranks[1]["tokens"] == want_tokens
    diffs = [abs(a - b) for got, want in zip(ranks[0]["prompt_logprobs"], want_lps) for a, b in zip(got, want)]
    assert max(diffs) < 1e-4
    for r in ranks:  # each rank: half of what is sharded, plus what every rank holds whole
        assert r["bytes"]["weights"] == pytest.approx((weights - replicated_weights) / 2 + replicated_weights, rel=0.02)
        assert r["bytes"]["kv"] <= 0.6 * kv  # its own groups' pools (a mixed plan's levels differ per rank)
    assert sum(r["bytes"]["kv"] for r in ranks) == pytest.approx(kv, rel=0.1)


def test_world_size_two_equals_one_with_four_kv_heads(tiny_models, tmp_path):
    model = tiny_models(heads=8, kv_heads=4, hidden=64)
    spec = spec_of(model)
    ranks, done = torchrun(tmp_path, spec)
    check(ranks, done, *single(spec))


@pytest.mark.slow  # two ranks start and load: half a minute
def test_world_size_two_equals_one_with_every_mlgc_level_chunked_and_prefix_cached(tiny_models, tmp_path):
    """A plan mixing full, window, full_int8 and window_int8 over each rank's groups; chunked prefill
    and prefix caching on (the third prompt repeats blocks of the second)."""
    model = tiny_models(heads=8, kv_heads=4, hidden=64)
    spec = spec_of(model, chunked_prefill=True, max_prefill_tokens=16, prefix_caching=True)
    spec["plan"] = str(mixed_plan(model, tmp_path / "plan.json"))
    spec["prompts"] = PROMPTS + [PROMPTS[1][:32] + [9, 9]]
    spec["params"] = spec["params"] + spec["params"][:1]
    ranks, done = torchrun(tmp_path, spec)
    check(ranks, done, *single(spec))


@pytest.mark.slow  # two ranks start
def test_a_world_size_that_does_not_divide_the_kv_heads_is_refused(tiny_models, tmp_path):
    model = tiny_models(heads=4, kv_heads=1)
    ranks, done = torchrun(tmp_path, spec_of(model))
    assert done.returncode != 0 and not ranks
    assert "num_key_value_heads=1, which world size 2 does not divide" in done.stderr


@pytest.mark.parametrize("variant", ["w8a16", "w4a16", "w4a16_per_channel", "w8a8", "w8a8_dynamic", "at_load"])
def test_quantized_checkpoints_shard_with_their_scales(float_model, quantized, variant, tmp_path):
    """msModelSlim's formats (and --quantize w8a16 at load): scales, offsets, int4 packing and W8A8's
    deq_scale / quant_bias cut with their weights (a row-parallel quant_bias is added once)."""
    model = float_model if variant == "at_load" else quantized(variant)
    spec = spec_of(model, quantize="w8a16" if variant == "at_load" else None)
    ranks, done = torchrun(tmp_path, spec)
    assert done.returncode == 0, done.stderr[-3000:]
    tokens, lps, *_ = single(spec)
    assert ranks[0]["tokens"] == ranks[1]["tokens"]
    gap = max(abs(a - b) for got, want in zip(ranks[0]["prompt_logprobs"], lps) for a, b in zip(got, want))
    if variant in ("w8a16", "at_load", "w8a8"):  # fp32 products, or exact int32 sums: world size 1's numbers
        assert gap < 1e-4 and ranks[0]["tokens"] == tokens
        return
    # W4A16's int4 kernel takes bf16 activations and rounds each shard's partial sums, W8A8_DYNAMIC
    # scales each token by the largest value of the rank's slice: not world size 1's numbers, as
    # close to the float model's
    reference = [[p for p in o] for o in single(spec_of(float_model))[1]]
    err = lambda got: max(abs(a - b) for g, w in zip(got, reference) for a, b in zip(g, w))  # noqa: E731
    assert err(ranks[0]["prompt_logprobs"]) <= 1.5 * err(lps) + 0.02, (err(ranks[0]["prompt_logprobs"]), err(lps))


@pytest.mark.slow  # two ranks start
def test_speculative_decoding_at_world_size_two_equals_plain_decoding(tiny_models, tmp_path):
    """Prompt lookup over a plan of every level: rank 0's accepted tokens reach every rank, whose
    schedulers, block tables and window copies stay in step; the answers are plain decoding's."""
    model = tiny_models(heads=8, kv_heads=4, hidden=64)
    plain = spec_of(model)
    plain["plan"] = str(mixed_plan(model, tmp_path / "plan.json"))
    spec = plain | {"engine": plain["engine"] | {"speculative": "ngram"}}
    ranks, done = torchrun(tmp_path, spec)
    tokens, lps, weights, kv, whole = single(plain)
    check(ranks, done, tokens, lps, weights, kv, whole)


@pytest.mark.slow
def test_int8_levels_measure_their_kv_scales_per_rank(tiny_models, tmp_path):
    """kv_quant c8 without a checkpoint's scales: each rank measures its own KV heads' (the probe
    runs on every rank together) and the answers equal world size 1's."""
    model = tiny_models(heads=8, kv_heads=4, hidden=64)
    spec = spec_of(model, kv_quant="c8")
    ranks, done = torchrun(tmp_path, spec)
    check(ranks, done, *single(spec))


@pytest.mark.slow  # two ranks start
def test_a_lost_rank_ends_the_run_with_an_error_not_a_hang(tiny_models, tmp_path):
    """Rank 1 exits after three steps: rank 0's next collective fails (gloo: the peer closed) and
    torchrun ends the run, well within the collective timeout."""
    import time

    spec = spec_of(tiny_models(heads=8, kv_heads=4, hidden=64)) | {"die": {"rank": 1, "step": 3}}
    start = time.monotonic()
    ranks, done = torchrun(tmp_path, spec)
    assert done.returncode != 0 and not ranks
    assert time.monotonic() - start < 120
    assert "exitcode  : 3" in done.stderr or "exit code 3" in done.stderr, done.stderr[-2000:]


def test_the_default_model_at_world_size_two(default_model, tmp_path):
    """Qwen2.5-Coder-0.5B (2 KV heads: one per rank, tied embeddings: the LM head whole on each)."""
    spec = spec_of(default_model, max_input_length=48, max_output_length=8)
    spec["prompts"] = [[14582, 374, 264, 3974, 3110, 13, 1096, 220, 16, 17], list(range(1000, 1030))]
    spec["params"] = [dict(max_tokens=8, prompt_logprobs=0, ignore_eos=True)] * 2
    ranks, done = torchrun(tmp_path, spec)
    tokens, lps, weights, kv, whole = single(spec)
    check(ranks, done, tokens, lps, weights, kv, whole)


@pytest.mark.slow  # a server of two ranks starts
def test_the_server_at_tensor_parallel_size_two_answers_as_one_rank(tiny_models):
    """`--tensor_parallel_size 2` starts its own ranks: rank 0 serves, rank 1 replays its requests.
    Concurrent greedy requests (one streamed, one aborted by its client mid-stream, n = 2 siblings)
    equal world size 1's answers, and SIGTERM (to torchrun, which passes it on) ends every rank."""
    import signal
    import threading

    import httpx

    sys.path.insert(0, str(Path(__file__).parent / "server"))
    from server_util import free_port, wait_until

    model = tiny_models(heads=8, kv_heads=4, hidden=64)
    port, url = free_port(), None
    cmd = [sys.executable, "-m", "atb_llm.entrypoints.openai", "-m", str(model), "--port", str(port),
           "--tensor_parallel_size", "2", "--block_size", "16", "--max_input_length", "64",
           "--max_output_length", "400", "--dtype", "fp32", "--max_batch_size", "4"]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        assert proc.poll() is None, proc.stdout.read()
        try:
            return httpx.get(url + "/health").status_code == 200
        except httpx.TransportError:
            return False

    engine = LLMEngine(EngineConfig(str(model), **ENGINE))
    want = [o.text for o in engine.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))]
    answers: dict[int, list] = {}

    def ask(i: int) -> None:
        body = {"prompt": PROMPTS[i], "max_tokens": 12, "ignore_eos": True, "n": 2, "temperature": 0}
        answers[i] = [c["text"] for c in httpx.post(url + "/v1/completions", json=body, timeout=120).json()["choices"]]

    try:
        wait_until(up, 180, "the two-rank server to serve /health")
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        body = {"prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:  # left after 3 events
            for n, _ in enumerate(r.iter_lines()):
                if n == 5:
                    break
        for t in threads:
            t.join(120)
        assert [answers[i] for i in range(len(PROMPTS))] == [[w, w] for w in want]
        ask(1)  # after the abort, the ranks still agree
        assert answers[1] == [want[1]] * 2
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)  # torchrun passes SIGTERM to every rank, then exits 1 itself
        assert "Finished server process" in out, out[-3000:]  # rank 0 ended its requests and stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow  # two ranks start
def test_calibration_at_world_size_two_writes_the_plan_of_one(tiny_models, tmp_path):
    """Each rank probes its own query heads; the gathered scores and the plan equal one process's."""
    from atb_llm.entrypoints import calibrate

    model = tiny_models(heads=8, kv_heads=4, hidden=64)
    flags = ["-m", str(model), "--period", "24", "--samples", "2", "--block_size", "16", "--sink", "4",
             "--recent", "11", "--reference_tokens", "64", "--dtype", "fp32", "--kv_budget", "0.5"]  # fmt: skip
    one = MlgcPlan.load(calibrate.main(flags + ["-o", str(tmp_path / "one.json")]))
    cmd = [sys.executable, "-m", "atb_llm.entrypoints.calibrate", *flags, "--world_size", "2"]
    cmd += ["-o", str(tmp_path / "two.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    two = MlgcPlan.load(tmp_path / "two.json")
    assert two.to_layout().levels == one.to_layout().levels
    for kind in ("echo", "induction"):
        assert sum(two.scores[kind], []) == pytest.approx(sum(one.scores[kind], []), abs=1e-6)
    assert done.stdout.count("plan written to") == 1  # rank 0 alone prints and writes


def test_a_rank_without_its_own_device_is_refused_before_loading(monkeypatch):
    """torchrun started more ranks on a machine than it has cards: the rank stops with both numbers."""
    import torch.distributed as dist

    from atb_llm.utils import distributed

    monkeypatch.setattr(dist, "is_torchelastic_launched", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit, match="local rank 1 needs cuda device 1, but this machine has 1"):
        distributed.init_tensor_parallel("cuda")
