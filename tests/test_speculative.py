"""Speculative decoding gives exactly what decoding without it gives: token by token (greedy, fp32)
on a full cache and on a plan with every level (window folds inside verified spans), with chunked
prefill, prefix caching, siblings, logprobs and stops; the same cache afterwards (block counts,
rings, compensation slots); and, sampled, the target's distribution."""

import pytest
import torch

from atb_llm.compression.levels import FullInt8, Level, Window, WindowInt8
from atb_llm.compression.plan import plan_from_levels
from atb_llm.models.base.router import get_router
from atb_llm.runtime import speculative
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sampler import Sampler
from atb_llm.runtime.sequence import SamplingParams, Sequence
from atb_llm.runtime.speculative import NgramProposer, verify

PROMPTS = [[5, 9, 33, 2, 71, 18, 4, 60, 7] * 3, list(range(40, 75)) + list(range(40, 60)), [200, 3, 3, 150, 90] * 8]
ENGINE = dict(block_size=16, max_input_length=64, max_output_length=48, progress=False, dtype="fp32")


def test_prompt_lookup_proposes_what_followed_the_latest_earlier_occurrence_of_the_longest_suffix():
    p = NgramProposer(k=3, n_max=3)
    assert p.propose([1, 2, 3, 9, 1, 2, 3, 8, 7, 1, 2, 3]) == [8, 7, 1]  # 3-gram, latest earlier occurrence
    assert p.propose([4, 5, 6, 7, 1, 2, 9, 9, 2]) == [9, 9, 2]  # no 3- or 2-gram: the 1-gram "2"
    assert p.propose([1, 2, 3, 1, 2]) == [3, 1, 2]
    assert p.propose([1, 2, 3, 1, 2], k=1) == [3]  # a sequence's room caps k
    assert p.propose([1, 2, 3, 4]) == [] and p.propose([7]) == [] and p.propose([1, 2, 3, 1], k=0) == []
    assert NgramProposer(k=2, n_max=2, n_min=2).propose([5, 1, 2, 6, 7, 2]) == []  # "2" alone is too short
    with pytest.raises(ValueError, match="num_speculative_tokens=0"):
        NgramProposer(k=0)


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models(heads=8, kv_heads=4, hidden=64)


def every_level(model):
    """Full, window, full_int8 and window_int8 spread over the groups; windows of sink 4 + recent 11
    fold at every step of these prompts, inside every verified span."""
    config = get_router(model).get_config()
    kinds = [Level(), Window(sink=4, recent=11), FullInt8(), WindowInt8(sink=4, recent=11)]
    h = config.num_key_value_heads
    chosen = [kinds[(g // h + g % h) % 4] for g in range(config.num_groups)]
    return plan_from_levels(config, chosen, 16, 4, 11, "test", None).to_layout()


def run(engine: LLMEngine, params: list[SamplingParams], siblings: bool = False) -> list[list[int]]:
    seqs = [engine.add_request(p, sp, f"r{i}") for i, (p, sp) in enumerate(zip(PROMPTS, params))]
    if siblings:
        seqs.append(engine.add_request(PROMPTS[0], params[0], "r0b", sibling_of="r0"))
    while engine.has_unfinished():
        engine.step()
    return [s.output_token_ids for s in seqs]


def scripted(engine: LLMEngine, reference: dict[str, list[int]], k: int | None = None):
    """A proposer that knows the answer: K = 1, 2 or 3 by sequence (or `k`; none at every fifth
    step), the true next tokens with one of them wrong every other step, so verify spans are
    accepted whole, in part and not at all."""
    calls = [0]
    k_fixed = k

    def propose(seq: Sequence) -> list[int]:
        calls[0] += 1
        n, want = len(seq.output_token_ids), reference[seq.request_id]
        k = min(k_fixed or 1 + int(seq.request_id[1]) % 3, seq.params.max_tokens - n - 1)
        if calls[0] % 5 == 0 or k < 1:
            return []
        tokens = list(want[n : n + k])
        if calls[0] % 2 and tokens:
            tokens[calls[0] % len(tokens)] += 1
        return tokens

    engine.scheduler.propose = lambda seqs: [propose(s) for s in seqs]
    return calls


CASES = {
    "full": {},
    "every_level": {"plan": True},
    "every_level_chunked_prefix": {"plan": True, "chunked_prefill": True, "max_prefill_tokens": 16,
                                   "prefix_caching": True},
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_output_equals_decoding_without_speculation(model, case):
    extra = dict(CASES[case])
    layout = every_level(model) if extra.pop("plan", False) else None
    params = [SamplingParams(max_tokens=40, ignore_eos=True)] * 3
    plain = LLMEngine(EngineConfig(str(model), **ENGINE, **extra), layout=layout)
    want = run(plain, params, siblings=True)
    reference = dict(zip(["r0", "r1", "r2", "r0b"], want))

    spec = LLMEngine(EngineConfig(str(model), speculative="ngram", **ENGINE, **extra), layout=layout)
    scripted(spec, reference)
    assert run(spec, params, siblings=True) == want
    proposed, accepted, verified = spec.stats().speculation
    assert 0 < accepted < proposed and verified > 20  # spans accepted whole, in part and not at all
    bm = spec.cache_manager.block_manager
    assert all(n == 0 for n in bm.used_by_level.values())  # every block this run took is back

    ngram = LLMEngine(EngineConfig(str(model), speculative="ngram", **ENGINE, **extra), layout=layout)
    assert run(ngram, params, siblings=True) == want  # the real proposer too


def group_state(engine: LLMEngine, seq: Sequence) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per group: blocks held and the K, V of the slots decode reads at the computed length (the
    compensation slot only once it holds something)."""
    kv, layout, out = engine.cache_manager.kv_cache, engine.cache_manager.layout, []
    n = torch.tensor([seq.num_computed_tokens])
    for g, level in enumerate(layout.levels):
        ids = seq.block_table[g]
        k, v = kv.pools[level.pool].gather(torch.tensor(ids), torch.float32)
        read = int(level.read_len(n))
        keep = torch.ones(read, dtype=torch.bool)
        if level.comp_slot is not None and level.comp_slot < read and int(level.evicted(n)) == 0:
            keep[level.comp_slot] = False
        out.append((len(ids), k[:read][keep], v[:read][keep]))
    return out


def test_the_cache_after_verify_steps_equals_plain_decodes(model):
    """After each verify step (many rejections), every group holds the blocks and the slot contents
    plain decode holds at the same length: no stray slot in a ring, no rejected token folded into
    a compensation slot, no extra block (spans of 7 cross block boundaries and are cut short)."""
    layout = every_level(model)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain = LLMEngine(EngineConfig(str(model), **ENGINE), layout=layout)
    spec = LLMEngine(EngineConfig(str(model), speculative="ngram", **ENGINE), layout=layout)
    want = plain.generate([PROMPTS[1]], params)[0].token_ids
    scripted(spec, {"r1": want}, k=7)
    a = plain.add_request(PROMPTS[1], params, "r1")
    b = spec.add_request(PROMPTS[1], params, "r1")
    compared = 0
    while not b.is_finished:
        spec.step()
        if b.is_finished or not b.output_token_ids:
            continue
        while a.num_computed_tokens < b.num_computed_tokens:
            plain.step()
        assert a.output_token_ids == b.output_token_ids
        for (na, ka, va), (nb, kb, vb) in zip(group_state(plain, a), group_state(spec, b)):
            assert na == nb
            scale = float(ka.abs().max()) / 127 * 1.01 + 1e-5  # int8 groups: a code step at most
            torch.testing.assert_close(kb, ka, atol=scale, rtol=0)
            torch.testing.assert_close(vb, va, atol=scale, rtol=0)
        compared += 1
    assert compared > 5


def test_logprobs_and_stop_tokens_inside_a_verified_span(model):
    """Log-probabilities of the accepted tokens as plain decode gives them; a stop token accepted
    mid-span ends the sequence there, its later tokens dropped."""
    plain = LLMEngine(EngineConfig(str(model), **ENGINE))
    free = plain.generate(PROMPTS, SamplingParams(max_tokens=30, ignore_eos=True))
    params = [SamplingParams(max_tokens=30, logprobs=2, stop_token_ids=(o.token_ids[12],)) for o in free]
    want = plain.generate(PROMPTS, params)
    spec = LLMEngine(EngineConfig(str(model), speculative="ngram", **ENGINE))
    scripted(spec, {f"r{i}": o.token_ids for i, o in enumerate(free)})
    seqs = [spec.add_request(p, sp, f"r{i}") for i, (p, sp) in enumerate(zip(PROMPTS, params))]
    while spec.has_unfinished():
        spec.step()
    got = [spec.output(s) for s in seqs]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.finish_reason for g in got] == [w.finish_reason for w in want] == ["stop"] * 3
    for g, w in zip(got, want):
        for a, b in zip(g.output_logprobs, w.output_logprobs):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def target_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    seq = Sequence([1], params)
    return Sampler().distribution(logits, seq)


def first_token_frequencies(logits, params, proposal, draws=20000) -> torch.Tensor:
    seq = Sequence([1], params)
    counts = torch.zeros(logits.shape[-1])
    sampler = Sampler()
    for _ in range(draws):
        counts[verify(sampler, logits, seq, proposal).tokens[0]] += 1
    return counts / draws


def test_sampled_tokens_follow_the_target_distribution(monkeypatch):
    """Temperature and top-p: the first token's frequencies over 20000 seeded draws match the
    target's probabilities (total variation < 0.02, where two runs of the target itself differ by
    about 0.005), for a likely and an unlikely proposal; a rule that accepts every proposal fails."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 12, generator=gen) * 2
    params = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=7)
    p = target_distribution(logits[0], params)
    likely, unlikely = int(p.argmax()), int(p.argsort()[-4])
    for d in (likely, unlikely):
        freq = first_token_frequencies(logits, params, [d, 3])
        assert 0.5 * (freq - p).abs().sum() < 0.02, (d, freq, p)
    monkeypatch.setattr(speculative.torch, "rand", lambda *a, **k: torch.tensor(0.0))  # accept everything
    freq = first_token_frequencies(logits, params, [unlikely, 3], draws=2000)
    assert 0.5 * (freq - p).abs().sum() > 0.3


def test_penalties_apply_to_each_row_as_decode_applies_them(model):
    """Greedy with a repetition and a frequency penalty and min_tokens: each row is penalized with
    the proposals before it counted as output, so the answer equals plain decode's."""
    params = [SamplingParams(max_tokens=30, repetition_penalty=1.3, frequency_penalty=0.5, min_tokens=20)] * 3
    plain = LLMEngine(EngineConfig(str(model), **ENGINE))
    want = [o.token_ids for o in plain.generate(PROMPTS, params)]
    spec = LLMEngine(EngineConfig(str(model), speculative="ngram", **ENGINE))
    scripted(spec, dict(zip(["r0", "r1", "r2"], want)))
    assert run(spec, params) == want
    assert spec.stats().speculation[1] > 0


def test_seeded_sampling_repeats_itself(model):
    params = [SamplingParams(max_tokens=30, temperature=1.0, top_k=20, seed=s) for s in (1, 2, 3)]
    outs = []
    for _ in range(2):
        engine = LLMEngine(EngineConfig(str(model), speculative="ngram", **ENGINE))
        outs.append(run(engine, params))
    assert outs[0] == outs[1] and len({tuple(o) for o in outs[0]}) == 3


@pytest.mark.parametrize("case", ["full", "every_level"])
def test_a_draft_model_proposes_and_the_output_is_the_targets(model, tiny_models, case):
    """A draft of other weights (the same tokenizer) in a batch of three with a sibling: the output
    is plain decoding's; the target as its own (uncompressed) draft has nearly every proposal
    accepted on a full cache (under the plan, whose windows of 15 tokens change the answers, not)."""
    layout = every_level(model) if case == "every_level" else None
    params = [SamplingParams(max_tokens=40, ignore_eos=True)] * 3
    want = run(LLMEngine(EngineConfig(str(model), **ENGINE), layout=layout), params, siblings=True)
    other = tiny_models(heads=8, kv_heads=4, hidden=64, seed=1)
    for draft, floor in ((other, 0.0), (model, 0.95 if layout is None else 0.0)):
        cfg = EngineConfig(str(model), speculative="draft", draft_model=str(draft), **ENGINE)
        spec = LLMEngine(cfg, layout=layout)
        assert run(spec, params, siblings=True) == want
        assert spec.stats().acceptance_rate >= floor
        bm = spec.proposer.draft.cache_manager.block_manager
        assert not spec.proposer.mirrors and all(n == 0 for n in bm.used_by_level.values())


def test_a_draft_model_needs_the_targets_tokenizer(model, tmp_path):
    import json
    import shutil

    other = tmp_path / "draft"
    shutil.copytree(model, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first = next(iter(vocab))
    vocab["zz" + first] = vocab.pop(first)  # one token spelled otherwise
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="another tokenizer"):
        LLMEngine(EngineConfig(str(model), speculative="draft", draft_model=str(other), **ENGINE))
    with pytest.raises(ValueError, match="needs --draft_model"):
        EngineConfig(str(model), speculative="draft")


def test_a_failing_proposer_costs_speed_not_the_requests(model):
    params = [SamplingParams(max_tokens=12, ignore_eos=True)] * 3
    want = run(LLMEngine(EngineConfig(str(model), **ENGINE)), params)
    spec = LLMEngine(EngineConfig(str(model), speculative="ngram", **ENGINE))

    def broken(seqs):
        raise RuntimeError("the draft ran out of memory")

    spec.scheduler.propose = broken
    assert run(spec, params) == want
    assert spec.stats().speculation == (0, 0, 0)
