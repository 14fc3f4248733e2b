"""bench_gpu's CPU run: the command a CUDA machine runs, on a tiny config under Triton's interpreter.
It must check every kernel, time every row, and count the bytes each row reads consistently with
the cache layout and the weight formats."""

import os

import pytest

from benchmarks import bench_gpu

pytestmark = [
    pytest.mark.skipif(os.environ["TRITON_INTERPRET"] != "1", reason="needs TRITON_INTERPRET=1"),
    pytest.mark.slow,  # every kernel under the interpreter: minutes
]


def table(report: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split(" | ") for line in report.splitlines() if line.startswith("| ")]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows[1:] if not r[0].startswith("---")}


@pytest.mark.timeout(900)
def test_cpu_run_checks_the_kernels_and_prints_every_row(default_model, tmp_path, capsys):
    report = bench_gpu.main(["--device", "cpu", "--out", str(tmp_path / "report.md")])
    assert (tmp_path / "report.md").read_text() == report and report in capsys.readouterr().out
    assert "W4A16 GEMM 64x128 @ 256x128" in report and "W8A8 int8 GEMM 16x128 @ 256x128: exact" in report
    assert "cache write, pool int8, k_scale" in report and "decode attention, lengths [1, 7, 37, 38" in report
    assert "decode RoPE of q (fused with the cache write): max |triton - torch| 0 (<= 1e-05)" in report
    rows = table(report)
    names = ["decode, batch 1, 16 in", "first token, 64 in", "decode, batch 8, 16 in"]
    names += ["W8A16 decode, batch 1, 16 in", "W4A16 decode, batch 1, 16 in"]
    names += ["W8A8S gate/up GEMM 512x128, batch 1, int8", "W8A8S gate/up GEMM 512x128, batch 1, int4 + sparse"]
    names += ["decode, batch 4 at 96, full cache", "decode, batch 4 at 96, MLGC 0.25"]
    assert [n.split(" (")[0] for n in rows][:9] == names
    mb = {n.split(" (")[0]: float(r[3]) for n, r in rows.items()}
    assert mb["W4A16 decode, batch 1, 16 in"] < mb["W8A16 decode, batch 1, 16 in"] < mb["decode, batch 1, 16 in"]
    assert "W8A8S int4 + sparse GEMM 16x128 @ 256x128: exact" in report
    sparse = mb["W8A8S gate/up GEMM 512x128, batch 1, int4 + sparse"]
    assert mb["W8A8S gate/up GEMM 512x128, batch 1, int8"] == 0.07 and 0.03 < sparse < 0.045  # 65536 B; ~0.55x
    # tiny config: 2 layers x 2 KV heads, head_dim 32, fp32; 4 sequences of 96 tokens. Full: every
    # group reads 96 slots of K and V; MLGC 0.25: one group in four, the others windows of sink 4 +
    # compensation 1 + recent 43 (the recent 32 asked for, grown to fill 3 whole blocks of 16)
    slot = 2 * 32 * 4
    full, mlgc = 4 * 4 * 96 * slot, 4 * (96 + 3 * 48) * slot
    got = mb["decode, batch 4 at 96, full cache"] - mb["decode, batch 4 at 96, MLGC 0.25"]
    assert abs(got - (full - mlgc) / 1e6) < 0.011  # the table rounds to 0.01 MB
    for r in rows.values():
        assert float(r[0]) > 0 and float(r[4]) >= 0
