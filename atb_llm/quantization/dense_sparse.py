"""Dense-and-sparse storage of W8A8S weights on the GPU path: the int8 weight q [N, K] of a sparse
checkpoint holds 4-bit values but a few outliers, so it is kept exactly as

    q = d + o,   d = clamp(q, -8, 7) packed two per byte (int4),   o = q - d, sparse (CSR)

and x_q q^T = x_q d^T (Triton: int8 dots, int32 sums, half a byte per weight) + x_q o^T (a sparse
product in fp32, exact because every partial sum is an integer below 2^24; checked per row at
load), added in int32 so the product is the int8 GEMM's to the bit. Resident bytes: K/2 per row
plus 8 per outlier (fp32 value, int32 column) against K per row for int8.

On the CPU the int8 GEMM stays: unpacking the nibbles costs more than reading int8 with torch's
kernels (benchmarks/bench_sparse.py measures both).
"""

from __future__ import annotations

import warnings

import torch

from atb_llm.quantization.w4a16 import pack_int4, unpack_int4

INT4_MIN, INT4_MAX = -8, 7
EXACT_FP32 = 2**24  # integers below this add exactly in fp32


class DenseSparse:
    """x_q q^T for int8 activations x_q [M, K] (values -128..127) -> fp32 [M, N], from the int4 + outlier split."""

    def __init__(self, nibbles: torch.Tensor, outliers: torch.Tensor):
        self.nibbles, self.outliers = nibbles, outliers

    @classmethod
    def split(cls, q: torch.Tensor) -> DenseSparse | None:
        """The split of an int8 weight, or None where it is not exact (K odd, or a row with so many
        outliers that its sparse sum could pass 2^24) or saves nothing (outliers past 1/16 of the values)."""
        n, k = q.shape
        dense = q.clamp(INT4_MIN, INT4_MAX)
        outliers = (q - dense).float()
        per_row = (outliers != 0).sum(1)
        if k % 2 or int(per_row.max()) * 128 * 120 >= EXACT_FP32 or 8 * int(per_row.sum()) > n * k // 2:
            return None
        nibbles = pack_int4(dense)
        with warnings.catch_warnings():  # torch calls its CSR support beta; the products used here are plain
            warnings.simplefilter("ignore", UserWarning)
            csr = outliers.to_sparse_csr()
            crow, col = csr.crow_indices().int(), csr.col_indices().int()
            csr = torch.sparse_csr_tensor(crow, col, csr.values(), (n, k), check_invariants=True)
        return cls(nibbles, csr)

    def int8(self) -> torch.Tensor:
        """q again, exactly."""
        return unpack_int4(self.nibbles, 1) + self.outliers.to_dense().to(torch.int8)

    @property
    def nbytes(self) -> int:
        csr = self.outliers
        parts = [self.nibbles, csr.crow_indices(), csr.col_indices(), csr.values()]
        return sum(t.numel() * t.element_size() for t in parts)

    def __call__(self, xq: torch.Tensor) -> torch.Tensor:
        from atb_llm.quantization.triton_gemm import int4_int8_matmul  # triton only where it runs

        dense = int4_int8_matmul(xq.to(torch.int8), self.nibbles)
        sparse = torch.sparse.mm(self.outliers, xq.float().t()).t()
        return dense.add_(sparse.to(torch.int32)).float()
