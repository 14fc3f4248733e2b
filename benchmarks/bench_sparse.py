"""W8A8S on the CPU: does storing the weights as int4 plus sparse outliers (atb_llm.quantization.
dense_sparse, what the GPU path does) pay here? One linear at a time of a real W8A8S checkpoint,
batch-1 products of int8 activations, the mean of many calls:

    python -m benchmarks.bench_sparse W8A8S_DIR [--layer 0] [--calls 200]

- int8 GEMM: what the engine runs on the CPU (oneDNN, u8 x s8 with int32 sums);
- int4 + sparse, exact: the nibbles unpacked to int8 per call, torch._int_mm, the outliers added
  (the only exact CPU route with torch's kernels: its int4 kernel takes float activations);
- int4 kernel, bf16: torch's int4 weight-only kernel on the int4 part alone (the speed a 4-bit
  CPU kernel gives; not exact: it rounds its output to bf16), for scale.

Prints a Markdown table (ms per call, bytes, product exact or not) and writes results/sparse_cpu.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from atb_llm.quantization.dense_sparse import DenseSparse
from atb_llm.quantization.w8a8 import Int8Gemm
from benchmarks.common import cpu_flags, cpu_name, markdown_table

HERE = Path(__file__).parent


def timed(fn, calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def rows_for(name: str, q: torch.Tensor, calls: int) -> list[dict]:
    split = DenseSparse.split(q)
    if split is None:
        return []
    xq = torch.randint(-128, 128, (1, q.shape[1]), dtype=torch.int16)
    want = xq.float() @ q.float().T
    int8 = Int8Gemm(q)

    def exact_split():
        x8 = torch.cat([xq.to(torch.int8), xq.new_zeros(16, q.shape[1], dtype=torch.int8)])  # _int_mm: > 16 rows
        dense = torch._int_mm(x8, split.int8().t())[:1]
        return dense.float()

    dense4 = split.int8().clamp(-8, 7)
    packed = torch._convert_weight_to_int4pack_for_cpu((dense4 + 8).to(torch.int32), 1)
    n, k = q.shape
    scale_zero = torch.stack([torch.ones(k // 128, n), torch.zeros(k // 128, n)], -1).to(torch.bfloat16)  # w = q
    x16 = xq.to(torch.bfloat16)

    def int4_kernel():
        return torch._weight_int4pack_mm_for_cpu(x16, packed, 128, scale_zero)

    out = []
    for method, fn, nbytes, exact in [
        ("int8 GEMM (the engine)", lambda: int8(xq), q.numel(), torch.equal(int8(xq), want)),
        ("int4 + sparse, exact", exact_split, split.nbytes, torch.equal(exact_split(), want)),
        ("int4 kernel on the int4 part, bf16", int4_kernel, q.numel() // 2, False),
    ]:
        out.append({"linear": f"{name} {tuple(q.shape)}", "storage": method, "ms": timed(fn, calls),
                    "MiB": nbytes / 2**20, "exact": "yes" if exact else "no"})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="a W8A8S checkpoint (convert_quant_weight.sh -type w8a8s)")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    tensors = {}
    for f in sorted(args.folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    pre = f"model.layers.{args.layer}."
    rows = []
    for name, t in tensors.items():
        if name.startswith(pre) and name.endswith(".weight") and t.dtype == torch.int8:
            rows += rows_for(name.removeprefix(pre).removesuffix(".weight"), t, args.calls)
    head = f"CPU: {cpu_name()} ({cpu_flags()}), {torch.get_num_threads()} threads, batch 1, layer {args.layer}\n\n"
    table = head + markdown_table(rows, ["linear", "storage", "ms", "MiB", "exact"])
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sparse_cpu.md").write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
