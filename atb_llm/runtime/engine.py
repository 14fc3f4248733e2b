"""The engine: requests in, tokens out. Loads the model, sizes the cache, and runs the loop of
continuous batching: schedule, run, postprocess."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from tqdm import tqdm

from atb_llm.cache.cache_manager import CacheConfig, CacheManager
from atb_llm.compression.layout import GroupLayout
from atb_llm.compression.plan import resolve_layout
from atb_llm.config import parse_dtype
from atb_llm.layers.attention.backend import AttentionBackend
from atb_llm.layers.attention.metadata import AttentionMetadata
from atb_llm.layers.attention.selector import get_backend
from atb_llm.layers.parallel import TensorParallel
from atb_llm.models.base.lora import BASE, adapter_paths, read_adapter
from atb_llm.models.base.router import get_router
from atb_llm.models.base.weights import WeightFiles
from atb_llm.runtime.cuda_graph import DecodeGraphs, buffer_blocks, use_graphs
from atb_llm.runtime.engine_config import EngineConfig
from atb_llm.runtime.kv_probe import measure_kv_scales
from atb_llm.runtime.model_runner import ModelRunner
from atb_llm.runtime.outputs import Detokenizer, RequestOutput
from atb_llm.runtime.request_limits import RequestError, RequestLimits
from atb_llm.runtime.scheduler import Scheduler
from atb_llm.runtime.sequence import SamplingParams, Sequence
from atb_llm.runtime.speculative import DraftProposer, NgramProposer
from atb_llm.runtime.stats import EngineStats

__all__ = ["EngineConfig", "LLMEngine", "RequestOutput"]


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
        self.tp = TensorParallel.current()  # torchrun: this rank of the world; otherwise a single rank
        if self.model_config.num_key_value_heads % self.tp.world:
            raise ValueError(
                f"the model has num_key_value_heads={self.model_config.num_key_value_heads}, which world size "
                f"{self.tp.world} does not divide (each rank holds whole KV heads); run at a world size that does"
            )
        weights = WeightFiles(cfg.model_path) if weights is None else weights
        backend = backend or get_backend(cfg.device, cfg.attention_backend)
        self.quant = router.get_quant_config(cfg.quantize)
        self.quant.lm_head = cfg.quantize_lm_head
        if backend.gpu_gemms:  # one kernel family: the quantized linears' GEMMs too
            self.quant.gpu_gemms = True
        model_cls = router.get_model_cls()
        self.model = model_cls.build(self.model_config, backend, self.dtype, cfg.device, self.quant, self.tp)
        self.model.load_weights(weights, progress=cfg.progress)
        self.model.eval()
        self.adapter_paths = adapter_paths(cfg.model_path, cfg.lora_modules)  # name -> PEFT folder
        loras = [read_adapter(n, p) for n, p in self.adapter_paths.items()]
        self.model.load_adapters(loras)
        self.adapters = {BASE: 0} | {a.name: slot for slot, a in enumerate(loras, start=1)}  # name -> slot
        self.eos_token_ids = set(self.model_config.eos_token_ids) | {self.tokenizer.eos_token_id} - {None}
        self.detokenizer = Detokenizer(self.tokenizer, frozenset(self.eos_token_ids), self.max_seq_len)
        self.backend, self._kv_scales = backend, self.quant.kv_cache_scales
        self.set_layout(layout or self._layout())

    def set_layout(self, layout: GroupLayout) -> None:
        """Cache the groups as `layout` says from now on: new pools, block manager, scheduler and
        runner for the same model (calibration measures many layouts on one loaded model). Only
        between requests: those in flight would lose their cache."""
        if getattr(self, "scheduler", None) is not None and self.scheduler.has_unfinished():
            raise RuntimeError("set_layout with requests in flight; finish or abort them first")
        shape = (self.model_config.num_hidden_layers, self.model_config.num_key_value_heads)
        if (layout.num_layers, layout.num_kv_heads) != shape:
            raise ValueError(
                f"the layout has {layout.num_layers} layers x {layout.num_kv_heads} KV heads, the model "
                f"{shape[0]} x {shape[1]}; build it with GroupLayout.uniform({shape[0]}, {shape[1]}, ...)"
            )
        cfg = self.cfg
        if cfg.kv_quant == "c8" or self.quant.kv_quant == "C8":
            layout = layout.as_int8()
        self.layout = layout
        cache_cfg = CacheConfig(cfg.block_size, cfg.num_blocks, cfg.cache_memory_gb, cfg.prefix_caching)
        dims = (self.model_config.head_dim, self.dtype, cfg.max_batch_size, self.max_seq_len, cfg.device)
        self.cache_manager = CacheManager(layout.shard(self.tp.rank, self.tp.world), cache_cfg, *dims)  # its groups
        self.proposer = self._proposer() if cfg.speculative else None
        self.scheduler = Scheduler(
            self.cache_manager.block_manager,
            cfg.max_batch_size,
            cfg.max_prefill_tokens,
            cfg.chunked_prefill,
            self._propose if self.proposer else None,
        )
        self.runner = ModelRunner(self.model, self.cache_manager, frozenset(self.eos_token_ids), tp=self.tp)
        self.limits = RequestLimits(
            cfg.max_input_length,
            cfg.max_output_length,
            self.model_config.vocab_size,
            self.cache_manager.longest_sequence(self.max_seq_len),
        )
        self._seqs: dict[str, Sequence] = {}
        if any(level.int8 for level in layout.levels):
            self.ensure_kv_scales()
        if use_graphs(cfg.device, self.backend.cuda_graphs, cfg.enforce_eager):  # after the model's last change
            blocks, kv = buffer_blocks(self.max_seq_len, cfg.block_size), self.cache_manager.kv_cache
            self.runner.graphs = DecodeGraphs(self.model, kv, cfg.max_batch_size, blocks, self.max_seq_len, cfg.device)

    def _proposer(self) -> NgramProposer | DraftProposer:
        cfg = self.cfg
        if cfg.speculative == "ngram":
            return NgramProposer(cfg.num_speculative_tokens, cfg.ngram_max)
        return getattr(self, "proposer", None) or DraftProposer.load(self)  # a new layout keeps the loaded draft

    def ensure_kv_scales(self) -> None:
        """The K/V channel scales int8 levels smooth with: a C8 checkpoint's, or measured once here
        (they depend on the model alone)."""
        if not self._kv_scales:
            measure_kv_scales(self.model, self.model_config, self.dtype, self.cfg.device, self.cfg.block_size)
            self._kv_scales = True

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
        adapter: str | None = None,
    ) -> Sequence:
        """Queue a request after `self.limits` checked it (RequestError / ContextLengthError if not).
        `sibling_of`: the id of an unfinished request with the same prompt (n > 1 samples of one
        prompt): the prompt is computed once and the siblings start from copies of its cache.
        `adapter`: the name of a loaded LoRA adapter to run with (None or "base": the base model)."""
        seq = self._new_sequence(self.encode(prompt), params, request_id)
        seq.adapter = self.adapter_slot(adapter)
        parent = self._seqs.get(sibling_of) if sibling_of is not None else None
        if sibling_of is not None and (
            parent is None or parent.prompt_token_ids != seq.prompt_token_ids or parent.adapter != seq.adapter
        ):
            raise RequestError(f"sibling_of={sibling_of!r} names no unfinished request of the same prompt and adapter")
        self._seqs[seq.request_id] = seq
        self.scheduler.add(seq, parent)
        return seq

    def adapter_slot(self, name: str | None) -> int:
        """The model slot of a LoRA adapter by name (0: the base model); RequestError if none has it."""
        slot = self.adapters.get(BASE if name is None else name)
        if slot is None:
            raise RequestError(f"adapter {name!r} is not loaded; this engine serves {sorted(self.adapters)}", "adapter")
        return slot

    def _new_sequence(self, ids: list[int], params: SamplingParams | None, request_id: str | None) -> Sequence:
        """A request's sequence, once `self.limits` and the id have passed."""
        params = params or SamplingParams()
        self.limits.check(ids, params)
        if request_id is not None and request_id in self._seqs:
            raise RequestError(f"request_id {request_id!r} is already in use", "request_id")
        return Sequence(list(ids), params, request_id or "")

    def add_prefilled(self, p, params: SamplingParams | None = None, request_id: str | None = None) -> Sequence:
        """Queue a request whose prompt was prefilled already (atb_llm.runtime.shared_prefill.Prefilled):
        its stored K/V are written as this engine's layout keeps them, its first token is the
        prefill's, and it goes straight to decode. Raises RuntimeError when the batch or the pools
        have no room for it now."""
        seq, cm = self._new_sequence(p.prompt_ids, params, request_id), self.cache_manager
        n = seq.num_tokens
        if len(self.scheduler.running) >= self.cfg.max_batch_size or not cm.block_manager.can_allocate(
            seq.block_table, n
        ):
            raise RuntimeError("no room for a prefilled request now; step until some finish")
        cm.block_manager.allocate(seq.block_table, n)
        tables, length = cm.block_tables([seq.block_table]), cm.to_device(torch.tensor([n]))
        positions = cm.to_device(torch.arange(n))
        slots = cm.slots(tables, torch.zeros_like(positions), positions, length)
        meta = AttentionMetadata.build(True, tables, slots, length, n, self.cfg.block_size, self.dtype)
        for layer, (k, v) in enumerate(p.kv):
            self.backend.store(cm.kv_cache, layer, k, v, meta)
        seq.num_computed_tokens = n
        seq.output_token_ids.append(p.first_token)
        seq.first_token_time = time.perf_counter()
        self._seqs[seq.request_id] = seq
        self.scheduler.add_running(seq)
        reason = self.detokenizer.finish_reason(seq)
        if reason:
            self.scheduler.finish(seq, reason)
            self._seqs.pop(seq.request_id)
        return seq

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed at once."""
        seq = self._seqs.get(request_id)
        if seq is not None:
            self.scheduler.finish(seq, "abort")
            self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        """A finished or aborted request leaves the engine's table, and the proposer frees its state."""
        self._seqs.pop(request_id, None)
        if self.proposer is not None:
            self.proposer.release(request_id)

    def _propose(self, seqs: list[Sequence]) -> list[list[int]]:
        """Tokens to verify after each sequence's last one: none for forced tokens, and never more
        than its max_tokens leaves room for (the step's own token comes on top)."""
        room = [0 if s.params.force_tokens else s.params.max_tokens - len(s.output_token_ids) - 1 for s in seqs]
        return self.proposer.propose_batch(seqs, room)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop ---------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """One forward pass. Returns the sequences that got a token or failed alone (finished ones
        included); a prefill chunk that does not end its prompt gives none. What raises here is a
        failure of the engine, not of one request."""
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return []
        result = self.runner.run(seqs, is_prefill)
        out = self.scheduler.postprocess(seqs, is_prefill, result, self.detokenizer.finish_reason)
        self.cache_manager.flush_copies()  # snapshots and forks, before any block is written again
        for seq in out:
            if seq.is_finished:
                self._forget(seq.request_id)
        return out

    def text_of(self, seq: Sequence) -> str:
        return self.detokenizer.text_of(seq)

    def output(self, seq: Sequence) -> RequestOutput:
        return self.detokenizer.output(seq)

    def stats(self) -> EngineStats:
        cache, sched = self.cache_manager, self.scheduler
        pool_of_level = {lv.name: lv.pool for lv in self.layout.groups_by_level()}
        levels = {(pool_of_level[name], name): row for name, row in cache.usage_by_level().items()}
        prefix = cache.block_manager.prefix
        hits = None if prefix is None else (prefix.query_tokens, prefix.hit_tokens, prefix.num_cached_blocks)
        spec = (sched.num_proposed, sched.num_accepted, sched.num_verified) if self.proposer else None
        return EngineStats(
            len(sched.running), len(sched.waiting), sched.num_preemptions, cache.usage(), levels, hits, spec
        )

    def generate(
        self,
        prompts: list[str | list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
        adapters: list[str | None] | None = None,
    ) -> list[RequestOutput]:
        """`adapters`: each prompt's LoRA adapter (None: the base model)."""
        params = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        adapters = adapters or [None] * len(prompts)
        seqs = [self.add_request(p, sp, adapter=a) for p, sp, a in zip(prompts, params, adapters)]
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
