"""--compare lm_eval: the same items scored by lm-eval's own OpenAI client (`local-completions`)
against this engine's OpenAI server, to show that a real evaluation client gets the engine's
answers through the API (echo + logprobs, token-id prompts, as lm-eval sends them).

The items become an lm-eval task of their own (a JSON-lines file and a YAML beside it: prompt as
text, the options as choices, no delimiter), so both sides see the same prompts and options; lm-eval
runs as a separate process and its per-document log-likelihoods are read back from its samples file.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from atb_llm.entrypoints.openai.serve import ServerThread
from atb_llm.runtime.engine import EngineConfig
from modeltest.datasets import Task

TASK = "modeltest_items"
INSTALL_HINT = "pip install 'lm-eval[api]==0.4.13' (or pip install -e '.[eval]')"


def write_task(task: Task, folder: Path) -> None:
    docs = folder / "items.jsonl"
    with docs.open("w", encoding="utf-8") as f:
        for item in task.items:
            f.write(json.dumps(dict(prompt=item.prompt, choices=list(task.options), label=item.answer)) + "\n")
    yaml = f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""
    (folder / f"{TASK}.yaml").write_text(yaml, encoding="utf-8")


def read_samples(out: Path, n: int) -> list[list[float]]:
    files = sorted(out.rglob(f"samples_{TASK}_*.jsonl"))
    if not files:
        raise FileNotFoundError(f"lm-eval wrote no samples_{TASK}_*.jsonl under {out}")
    logprobs: list[list[float]] = [[] for _ in range(n)]
    for line in files[-1].read_text(encoding="utf-8").splitlines():
        sample = json.loads(line)
        logprobs[sample["doc_id"]] = [float(r[0]) for r in sample["filtered_resps"]]
    return logprobs


def score_lm_eval(task: Task, model_path: str, cfg: EngineConfig, port: int, on_item=None) -> list[list[float]]:
    """[item][option] log-likelihoods as lm-eval computes them from the server's answers."""
    if importlib.util.find_spec("lm_eval") is None:
        raise FileNotFoundError(f"--compare lm_eval needs lm-eval; {INSTALL_HINT}")
    with tempfile.TemporaryDirectory(prefix="modeltest-lm-eval-") as tmp, ServerThread.start(cfg, port) as server:
        folder = Path(tmp)
        write_task(task, folder)
        model_args = ",".join(
            [
                f"model={server.model_name}",
                f"base_url={server.url}/v1/completions",
                f"tokenizer={model_path}",
                "tokenizer_backend=huggingface",
                "tokenized_requests=True",
                f"max_length={cfg.max_input_length}",  # longer requests are cut from the left by lm-eval
                "max_retries=1",
                f"num_concurrent={cfg.max_batch_size}",  # concurrent requests, batched by the engine
            ]
        )
        cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args]
        cmd += ["--tasks", TASK, "--include_path", str(folder), "--output_path", str(folder / "out"), "--log_samples"]
        done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"lm-eval failed ({done.returncode}):\n{done.stderr[-3000:]}")
        logprobs = read_samples(folder / "out", len(task.items))
    if on_item is not None:
        for i, lp in enumerate(logprobs):
            on_item(i, lp)
    return logprobs
