"""The GPU path of the quantized linears, on CPU tensors under Triton's interpreter: the weight-only
GEMM kernel against an fp32 reference (int8 and int4, offsets, groups, ragged shapes, decode and
prefill row counts), and whole quantized models on the triton backend (Triton attention, Triton GEMM
for W8A16/W4A16, torch._int_mm for W8A8) against their references."""

import importlib.util
import os

import pytest
import torch
from quant_reference import dequantized_copy

from atb_llm.quantization.triton_gemm import wq_matmul
from atb_llm.quantization.w4a16 import quantize_w4_groups, unpack_int4
from atb_llm.quantization.w8a8 import Int8Gemm, IntMM
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams

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


needs_msmodelslim = pytest.mark.skipif(
    importlib.util.find_spec("msmodelslim") is None, reason="pip install msmodelslim==26.1.0 (setup.sh does)"
)


@needs_msmodelslim
@pytest.mark.parametrize("variant", ["w8a16", "w4a16", "w4a16_per_channel", "w8a8", "w8a8_dynamic"])
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
        assert isinstance(gpu_layer.gemm, IntMM) and isinstance(cpu_layer.gemm, Int8Gemm)
    else:
        _, ref_tokens, ref_lp = run(dequantized_copy(float_model, folder, variant, tmp_path / "ref"), "triton")
        assert gpu_layer.gpu
    assert gpu_tokens == ref_tokens
    assert torch.allclose(torch.tensor(gpu_lp), torch.tensor(ref_lp), atol=1e-4)
