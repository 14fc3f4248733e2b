"""The engine: requests in, tokens out. Loads the model, sizes the cache, runs the
schedule -> forward -> sample loop with continuous batching."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from atb_llm.cache.cache_manager import CacheConfig, CacheManager
from atb_llm.cache.kv_cache import KVCache
from atb_llm.compression.layout import GroupLayout
from atb_llm.compression.plan import resolve_layout
from atb_llm.config import parse_dtype
from atb_llm.layers.attention.backend import AttentionBackend
from atb_llm.layers.attention.paged_attention import PagedAttention, observed_kv_scales
from atb_llm.layers.attention.selector import get_backend
from atb_llm.models.base.router import get_router
from atb_llm.models.base.weights import WeightFiles
from atb_llm.runtime.cuda_graph import DecodeGraphs, buffer_blocks, use_graphs
from atb_llm.runtime.engine_config import EngineConfig
from atb_llm.runtime.model_runner import ModelRunner
from atb_llm.runtime.scheduler import Scheduler
from atb_llm.runtime.sequence import SamplingParams, Sequence, TokenLogprob

KV_PROBE_TOKENS = 256  # random tokens that measure K/V channel scales for int8 levels (see _measure_kv_scales)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    ttft_s: float | None
    tpot_s: float | None
    num_preemptions: int = 0
    logprobs: list[dict[int, float]] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None


class LLMEngine:
    def __init__(
        self,
        cfg: EngineConfig,
        layout: GroupLayout | None = None,
        backend: AttentionBackend | None = None,
        weights: Iterable[tuple[str, torch.Tensor]] | None = None,
    ):
        """`layout` overrides cfg.mlgc with a group layout; `backend` overrides the device's attention
        backend (calibration probes attention through it); `weights` gives the checkpoint's (name,
        tensor) pairs instead of the folder's files (random weights of a config, for benchmarks)."""
        self.cfg = cfg
        router = get_router(cfg.model_path)
        self.model_config = router.get_config()
        self.tokenizer = router.get_tokenizer()
        self.dtype = parse_dtype(cfg.dtype or self.model_config.dtype)
        self.max_seq_len = cfg.max_input_length + cfg.max_output_length
        if self.max_seq_len > self.model_config.max_position_embeddings:
            raise ValueError(
                f"max_input_length + max_output_length = {self.max_seq_len} exceeds the model's "
                f"max_position_embeddings={self.model_config.max_position_embeddings}; lower them"
            )
        weights = WeightFiles(cfg.model_path) if weights is None else weights
        backend = backend or get_backend(cfg.device, cfg.attention_backend)
        self.quant = router.get_quant_config(cfg.quantize)
        if cfg.attention_backend == "triton":  # one kernel family: the quantized linears' GEMMs too
            self.quant.triton = True
        self.model = router.get_model_cls().build(self.model_config, backend, self.dtype, cfg.device, self.quant)
        self.model.load_weights(weights, progress=cfg.progress)
        self.model.eval()
        self.layout = layout or self._layout()
        shape = (self.model_config.num_hidden_layers, self.model_config.num_key_value_heads)
        if (self.layout.num_layers, self.layout.num_kv_heads) != shape:
            raise ValueError(
                f"the layout has {self.layout.num_layers} layers x {self.layout.num_kv_heads} KV heads, the model "
                f"{shape[0]} x {shape[1]}; build it with GroupLayout.uniform({shape[0]}, {shape[1]}, ...)"
            )
        if cfg.kv_quant == "c8" or self.quant.kv_quant == "C8":
            self.layout = self.layout.as_int8()
        cache_cfg = CacheConfig(cfg.block_size, cfg.num_blocks, cfg.cache_memory_gb, cfg.prefix_caching)
        self.cache_manager = CacheManager(
            self.layout,
            cache_cfg,
            self.model_config.head_dim,
            self.dtype,
            cfg.max_batch_size,
            self.max_seq_len,
            cfg.device,
        )
        self.scheduler = Scheduler(
            self.cache_manager.block_manager, cfg.max_batch_size, cfg.max_prefill_tokens, cfg.chunked_prefill
        )
        self.eos_token_ids = set(self.model_config.eos_token_ids) | {self.tokenizer.eos_token_id} - {None}
        self.runner = ModelRunner(self.model, self.cache_manager, frozenset(self.eos_token_ids))
        self._seqs: dict[str, Sequence] = {}
        if any(level.int8 for level in self.layout.levels) and not self.quant.kv_cache_scales:
            self._measure_kv_scales()
        if use_graphs(cfg.device, backend.name, cfg.enforce_eager):  # after the model's last change
            blocks, kv = buffer_blocks(self.max_seq_len, cfg.block_size), self.cache_manager.kv_cache
            self.runner.graphs = DecodeGraphs(self.model, kv, cfg.max_batch_size, blocks, self.max_seq_len, cfg.device)

    def _measure_kv_scales(self) -> None:
        """Int8 levels without a C8 checkpoint's scales: measure every layer's K/V channel scales on one
        prompt of random tokens, prefilled in one piece into a float cache of its own (so the result
        depends on the model alone, not on the layout, chunking or prefix cache), and smooth with
        them (PagedAttention), as with a checkpoint's."""
        cfg, dev, bs = self.model_config, self.cfg.device, self.cfg.block_size
        n = min(KV_PROBE_TOKENS, cfg.max_position_embeddings)
        layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        seen: dict[PagedAttention, tuple[torch.Tensor, torch.Tensor]] = {}

        def observe(layer: PagedAttention, args: tuple) -> None:  # args: q, k, v, kv_cache, meta, rope
            seen[layer] = observed_kv_scales(args[1], args[2])

        full = GroupLayout.uniform(cfg.num_hidden_layers, cfg.num_key_value_heads)
        nb = -(-n // bs)
        kv = KVCache.allocate(full, {"model": full.num_groups * nb}, bs, cfg.head_dim, self.dtype, dev)
        tables = torch.arange(full.num_groups * nb, device=dev).view(full.num_groups, 1, nb)  # [G, 1, nb]
        slots = (tables[:, 0, :, None] * bs + torch.arange(bs, device=dev)).flatten(1)[:, :n]  # [G, n]
        probe = torch.randint(100, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).to(dev)
        hooks = [m.register_forward_pre_hook(observe) for m in layers]
        try:
            last, length = torch.tensor([n - 1], device=dev), torch.tensor([n], device=dev)
            self.model(probe, torch.arange(n, device=dev), True, kv, tables, slots, length, n, last)
        finally:
            for h in hooks:
                h.remove()
        for m in layers:
            m.set_kv_scale(*seen[m])

    def _layout(self) -> GroupLayout:
        return resolve_layout(self.cfg.mlgc, self.cfg.model_path, self.model_config, self.cfg.block_size)

    # ---- requests ---------------------------------------------------------------------------
    def encode(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            if chat:
                return self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
                )
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        return list(prompt)

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        sibling_of: str | None = None,
    ) -> Sequence:
        """`sibling_of`: the id of a running request with the same prompt (n > 1 samples of one
        prompt): the prompt is computed once and the siblings start from copies of its cache."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        self._validate(ids, params, request_id)
        parent = self._seqs.get(sibling_of) if sibling_of is not None else None
        if sibling_of is not None and (parent is None or parent.prompt_token_ids != ids):
            raise ValueError(f"sibling_of={sibling_of!r} names no unfinished request with the same prompt")
        seq = Sequence(ids, params, request_id or "")
        self._seqs[seq.request_id] = seq
        self.scheduler.add(seq, parent)
        return seq

    def _validate(self, ids: list[int], params: SamplingParams, request_id: str | None) -> None:
        cfg, vocab = self.cfg, self.model_config.vocab_size
        if not ids:
            raise ValueError("the prompt is empty; give at least one token")
        if len(ids) > cfg.max_input_length:
            raise ValueError(
                f"the prompt has {len(ids)} tokens, more than max_input_length={cfg.max_input_length}; "
                "shorten it or raise --max_input_length"
            )
        if params.max_tokens > cfg.max_output_length:
            raise ValueError(
                f"max_tokens={params.max_tokens} exceeds max_output_length={cfg.max_output_length}; "
                "lower it or raise --max_output_length"
            )
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id(s) {bad[:5]} are outside the vocabulary [0, {vocab})")
        if request_id is not None and request_id in self._seqs:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not self.cache_manager.fits_alone(len(ids) + params.max_tokens):
            raise ValueError(
                f"a sequence of {len(ids) + params.max_tokens} tokens needs "
                f"{self.cache_manager.blocks_for(len(ids) + params.max_tokens)} cache blocks but the "
                f"pools hold {self.cache_manager.num_blocks}; give the cache more memory"
            )

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed at once."""
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop ---------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """One forward pass. Returns the sequences that got a token (finished ones included); a
        prefill chunk that does not end its prompt gives none."""
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return []
        result = self.runner.run(seqs, is_prefill)
        now, bm = time.perf_counter(), self.cache_manager.block_manager
        for seq in seqs:
            seq.num_computed_tokens += ModelRunner.span(seq, is_prefill)[1]
            if is_prefill and seq.params.prompt_logprobs is not None:  # [0]: the first token has none
                seq.prompt_logprobs = (seq.prompt_logprobs or [None]) + result.prompt_logprobs.get(seq, [])
            if is_prefill and seq.num_uncomputed_tokens == 0:  # later requests may share its prompt now
                bm.cache(seq.block_table, seq.token_ids, seq.num_computed_tokens)
            if seq.snapshot_at and seq.num_computed_tokens == seq.snapshot_at:  # where requests meet
                bm.snapshot(seq.block_table, seq.token_ids, seq.snapshot_at)
            if seq.fork_at and seq.num_computed_tokens >= seq.fork_at:
                self.scheduler.fork(seq)
        self.cache_manager.flush_copies()  # snapshots and forks now, while every block is as computed
        for seq, tok, lp, out_lp in zip(result.seqs, result.tokens, result.option_logprobs, result.output_logprobs):
            if tok is not None:
                seq.output_token_ids.append(tok)
                if lp is not None:
                    seq.logprobs.append(lp)
                if out_lp is not None:
                    seq.output_logprobs.append(out_lp)
                seq.first_token_time = seq.first_token_time or now
            # None: sampling failed for this sequence alone (seq.error says why)
            reason = "error" if tok is None else self._finish_reason(seq, tok)
            if reason:
                seq.finish_time = now
                self.scheduler.finish(seq, reason)
                self._seqs.pop(seq.request_id, None)
        return result.seqs

    def _finish_reason(self, seq: Sequence, tok: int) -> str | None:
        p = seq.params
        if (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            return "stop"
        if p.stop:  # search the uncut text: text_of already cuts before a stop string
            text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
            if any(s in text for s in p.stop):
                return "stop"
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_seq_len:
            return "length"
        return None

    def visible_tokens(self, seq: Sequence) -> list[int]:
        """The output tokens that make its text: all but a final eos / stop token."""
        ids = seq.output_token_ids
        stop_ids = self.eos_token_ids | set(seq.params.stop_token_ids)
        if seq.finish_reason == "stop" and ids and ids[-1] in stop_ids:
            return ids[:-1]
        return ids

    def text_of(self, seq: Sequence) -> str:
        """Decoded output, cut before a stop string, without the eos / stop token."""
        text = self.tokenizer.decode(self.visible_tokens(seq), skip_special_tokens=True)
        for s in seq.params.stop:
            i = text.find(s)
            if i >= 0:
                text = text[:i]
        return text

    def output(self, seq: Sequence) -> RequestOutput:
        return RequestOutput(
            seq.request_id,
            seq.prompt_token_ids,
            list(seq.output_token_ids),
            self.text_of(seq),
            seq.is_finished,
            seq.finish_reason,
            seq.time_to_first_token(),
            seq.time_per_output_token(),
            seq.num_preemptions,
            list(seq.logprobs),
            list(seq.output_logprobs),
            seq.prompt_logprobs,
        )

    def generate(
        self,
        prompts: list[str | list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        params = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        with tqdm(total=len(seqs), desc="Generating", disable=not use_tqdm) as bar:
            while self.has_unfinished():
                done = sum(s.is_finished for s in self.step())
                if done:
                    bar.update(done)
        return [self.output(s) for s in seqs]

    @torch.inference_mode()
    def warmup(self) -> None:
        """One short request through prefill and decode, so first-call costs are not timed."""
        n = min(2, self.cfg.max_output_length)
        self.generate([[self.tokenizer.eos_token_id or 0] * 4], SamplingParams(max_tokens=n, ignore_eos=True))
