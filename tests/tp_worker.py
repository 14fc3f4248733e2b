"""Run under torchrun by tests/test_tensor_parallel.py: one engine per rank over the same requests;
rank 0 writes every request's tokens and prompt log-probabilities as JSON, each rank its resident
bytes. argv: OUT.json, then a JSON object of EngineConfig fields, the requests and the layout."""

import json
import os
import sys

import torch

from atb_llm.compression.plan import MlgcPlan
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams
from atb_llm.utils.distributed import init_tensor_parallel, leave_tensor_parallel

out, spec = sys.argv[1], json.loads(sys.argv[2])
torch.set_grad_enabled(False)
init_tensor_parallel("cpu")
layout = MlgcPlan.load(spec["plan"]).to_layout() if spec.get("plan") else None
engine = LLMEngine(EngineConfig(**spec["engine"]), layout=layout)
params = [SamplingParams(**p) for p in spec["params"]]
die = spec.get("die")  # {"rank": r, "step": n}: that rank exits abruptly after n steps (a lost rank)
seqs = [engine.add_request(p, sp) for p, sp in zip(spec["prompts"], params)]
steps = 0
while engine.has_unfinished():
    engine.step()
    steps += 1
    if die and engine.tp.rank == die["rank"] and steps == die["step"]:
        os._exit(3)
outs = [engine.output(s) for s in seqs]
weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
kv = engine.cache_manager.total_bytes
result = {
    "tokens": [o.token_ids for o in outs],
    "prompt_logprobs": [[p.logprob for p in o.prompt_logprobs[1:]] if o.prompt_logprobs else None for o in outs],
    "bytes": {"weights": weights, "kv": kv},
}
with open(f"{out}.rank{engine.tp.rank}", "w") as f:
    json.dump(result, f)
leave_tensor_parallel()
