"""The GPU path of the quantized linears, on CPU tensors under Triton's interpreter: the weight-only
GEMM kernel against an fp32 reference (int8 and int4, offsets, groups, ragged shapes, decode and
prefill row counts), and whole quantized models on the triton backend (Triton attention, Triton GEMM
for W8A16/W4A16, torch._int_mm for W8A8, int4 + sparse outliers for W8A8S) against their references."""

import importlib.util
import os

import pytest
import torch
from quant_reference import dequantized_copy

from atb_llm.quantization.dense_sparse import DenseSparse
from atb_llm.quantization.triton_gemm import int4_int8_matmul, wq_matmul
from atb_llm.quantization.w4a16 import quantize_w4_groups, unpack_int4
from atb_llm.quantization.w8a8 import Int8Gemm, IntMM
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams
from benchmarks import gpu_checks

if os.environ["TRITON_INTERPRET"] != "1" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no GPU to run the kernels", allow_module_level=True)


def reference(x, q, scale, zero, group, bias=None):
    """fp32 x @ W^T with W = q * scale + zero, groups of `group` input channels."""
    n, k = q.shape
    w = q.float().view(n, k // group, group) * scale[..., None] + zero[..., None]
    return x.float() @ w.view(n, k).T + (0 if bias is None else bias.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 16, 17, 70])
@pytest.mark.parametrize("kind", ["int8", "int4_g128", "int4_g64", "int4_g32"])
def test_weight_only_gemm_equals_the_fp32_reference(kind, m, dtype):
    torch.manual_seed(m)
    n, k = 200, 256 if kind != "int8" else 232  # ragged N (and K for int8) exercise the masks
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n) if m % 2 else None
    if kind == "int8":
        group = k
        q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        scale = torch.rand(n, 1) * 0.02
        zero = -scale * torch.randint(-3, 4, (n, 1)).float()  # offsets that are not zero
        got = wq_matmul(x, q, scale, zero, bias)
    else:
        group = int(kind.split("_g")[1])
        q, scale, offset = quantize_w4_groups(torch.randn(n, k), group)
        zero = -offset * scale
        nibbles = ((q[:, 0::2] & 0xF) | (q[:, 1::2] << 4)).contiguous()
        assert torch.equal(unpack_int4(nibbles, 1), q)
        got = wq_matmul(x, nibbles, scale, zero, bias, group, int4=True)
    want = reference(x, q, scale, zero, group, bias)
    assert got.dtype == dtype and got.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 2**-7  # bf16: the output's rounding
    assert (got.float() - want).abs().max() <= tol * want.abs().max()


def test_gemm_refuses_scales_that_do_not_fit():
    x, q = torch.randn(2, 256), torch.zeros(8, 128, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"scale \(8, 1\) / zero \(8, 1\) do not fit \[8, 256 / 128\]"):
        wq_matmul(x, q, torch.ones(8, 1), torch.zeros(8, 1), group=128, int4=True)
    with pytest.raises(ValueError, match="does not hold 256 input channels two per byte"):
        wq_matmul(x, torch.zeros(8, 100, dtype=torch.int8), torch.ones(8, 2), torch.zeros(8, 2), group=128, int4=True)


@pytest.mark.parametrize("m", [1, 16, 17, 40])
def test_int_mm_pads_decode_rows_and_equals_the_cpu_gemm(m):
    torch.manual_seed(m)
    q = torch.randint(-128, 128, (48, 64), dtype=torch.int8)
    xq = torch.randint(-128, 128, (m, 64)).to(torch.int16)
    want = xq.float() @ q.float().T
    assert torch.equal(IntMM(q)(xq), want)
    assert torch.equal(Int8Gemm(q)(xq), want)


def sparse_like(n, k, outlier_share, seed=0):
    """gpu_checks' W8A8S-like weights, with the extremes that leave int4's range by one among the outliers."""
    q = gpu_checks.sparse_like(n, k, torch.Generator().manual_seed(seed), outlier_share)
    q[0, :4] = torch.tensor([-128, 127, -9, 8], dtype=torch.int8)
    return q


@pytest.mark.parametrize("m", [1, 16, 17, 70])
def test_dense_sparse_storage_equals_the_int8_storage_exactly(m):
    """int4 + outliers holds the int8 weight to the bit, multiplies to the int8 GEMM's product to the
    bit (the Triton kernel's int32 sums plus the sparse part), and takes about half its bytes."""
    n, k = 200, 192  # ragged N against the kernel's 64-wide tiles
    q = sparse_like(n, k, 0.015, seed=m)
    split = DenseSparse.split(q)
    assert torch.equal(split.int8(), q)
    xq = torch.randint(-128, 128, (m, k), generator=torch.Generator().manual_seed(m)).to(torch.int16)
    xq[0] = -128  # the largest products
    want = Int8Gemm(q)(xq)
    assert torch.equal(want, xq.float() @ q.float().T)
    assert torch.equal(split(xq), want) and torch.equal(IntMM(q)(xq), want)
    assert torch.equal(
        int4_int8_matmul(xq.to(torch.int8), split.nibbles).float(), xq.float() @ q.clamp(-8, 7).float().T
    )
    nnz = int((q.clamp(-8, 7) != q).sum())
    assert split.nbytes == n * k // 2 + 8 * nnz + 4 * (n + 1) and split.nbytes < 0.7 * q.numel()


def test_dense_sparse_product_rounds_once_like_the_int8_gemm():
    """Past 2^24 an fp32 product is rounded: the int4 and outlier parts are added as integers first, so the
    one rounding is that of the GPU path's int8 GEMM (torch._int_mm's int32 sums). Here the int4
    part is 2^24 + 1 (a tie, which fp32 rounds down) and the outlier part 1: rounded apart they give
    2^24, together 2^24 + 2."""
    x = torch.tensor([127] * 18872 + [1, 1, 1, 0], dtype=torch.int16)[None]
    q = torch.tensor([[7] * 18872 + [1, 1, 8, 0]], dtype=torch.int8)  # 8 = 7 + an outlier of 1
    want = IntMM(q)(x)
    assert want.item() == 2**24 + 2 == float(x.long() @ q.long().T)
    assert torch.equal(DenseSparse.split(q)(x), want)


def test_dense_sparse_split_is_refused_where_it_is_not_exact_or_not_smaller():
    assert DenseSparse.split(sparse_like(8, 64, 0.0)) is not None
    assert DenseSparse.split(sparse_like(8, 63, 0.0)) is None  # K odd: no whole bytes
    assert DenseSparse.split(sparse_like(8, 64, 0.2)) is None  # 8 bytes an outlier: more than int8
    # a row's outliers add exactly in fp32 while 128 * 120 * count < 2^24: 1092 of them, not 1093
    for count, exact in [(1092, True), (1093, False)]:
        q = torch.zeros(2, 9000, dtype=torch.int8)
        q[0, :count] = -128
        assert (DenseSparse.split(q) is not None) == exact


needs_msmodelslim = pytest.mark.skipif(
    importlib.util.find_spec("msmodelslim") is None, reason="pip install msmodelslim==26.1.0 (setup.sh does)"
)


@needs_msmodelslim
@pytest.mark.parametrize("variant", ["w8a16", "w4a16", "w4a16_per_channel", "w8a8", "w8a8_dynamic", "w8a8s"])
def test_quantized_model_on_the_gpu_kernels_equals_its_reference(float_model, quantized, variant, tmp_path):
    """The triton backend runs attention and the quantized linears in the GPU kernels (here under the
    interpreter). Weight-only formats: greedy tokens and their log-probs equal the dequantized float
    model's on the same backend (fp32: only the GEMM differs). W8A8: equal to the CPU kernels'
    (both exact integer products)."""
    folder = quantized(variant)
    prompts = [list(range(5, 45)), list(range(60, 63))]

    def run(path, backend):
        cfg = EngineConfig(str(path), dtype="fp32", block_size=16, max_input_length=64, max_output_length=6,
                           attention_backend=backend)  # fmt: skip
        eng = LLMEngine(cfg)
        layer = eng.model.model.layers[0].mlp.gate_up_proj
        outs = eng.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True, logprobs=1))
        return layer, [o.token_ids for o in outs], [[t.logprob for t in o.output_logprobs] for o in outs]

    gpu_layer, gpu_tokens, gpu_lp = run(folder, "triton")
    if variant.startswith("w8a8"):
        cpu_layer, ref_tokens, ref_lp = run(folder, "torch")
        assert isinstance(gpu_layer.gemm, DenseSparse if variant == "w8a8s" else IntMM)
        assert isinstance(cpu_layer.gemm, Int8Gemm)
    else:
        _, ref_tokens, ref_lp = run(dequantized_copy(float_model, folder, variant, tmp_path / "ref"), "triton")
        assert gpu_layer.gpu
    assert gpu_tokens == ref_tokens
    assert torch.allclose(torch.tensor(gpu_lp), torch.tensor(ref_lp), atol=1e-4)
