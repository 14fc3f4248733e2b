"""The fused elementwise kernels of the GPU path (residual add + RMSNorm, RoPE over q and k) on CPU
tensors under Triton's interpreter, against the torch code they replace: the same values in fp32,
within the last bit of an fp16 value, within a few of a bf16 one (the interpreter truncates
fp32 -> bf16 where torch rounds to nearest)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton_ops is imported: its kernels run on CPU tensors

import pytest
import torch

from atb_llm.layers.norm import RMSNorm
from atb_llm.layers.rotary import RotaryEmbedding, apply_rotary
from atb_llm.layers.triton_ops import add_rms_norm, rotary

if os.environ["TRITON_INTERPRET"] != "1" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no GPU to run the kernels", allow_module_level=True)

# relative step of the dtype; bf16: four, as the interpreter truncates at each of up to three
# roundings in a row (residual sum, normalised value, product) where torch rounds to nearest
ULP = {torch.float32: 0.0, torch.float16: 2**-10, torch.bfloat16: 2**-5}


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    """fp32: equal to 1e-6 relative; 16-bit: within a step of the dtype (bf16: four)."""
    got, want = got.float(), want.float()
    # 16-bit: steps of the value, or of 1 below 1 (RoPE's sum of two products cancels to small values)
    tol = 1e-6 * want.abs().max() if dtype == torch.float32 else ULP[dtype] * want.abs().clamp(min=1)
    return bool(((got - want).abs() <= tol).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens, hidden", [(1, 64), (5, 96), (9, 896)])
def test_add_rms_norm_equals_torch(tokens, hidden, dtype):
    torch.manual_seed(hidden)
    norm = RMSNorm(hidden, 1e-6)
    norm.weight.data = (1 + 0.1 * torch.randn(hidden)).to(dtype)
    x, residual = (torch.randn(tokens, hidden) * 3).to(dtype), torch.randn(tokens, hidden).to(dtype)
    assert close(add_rms_norm(x, norm.weight, norm.eps), norm(x), dtype)
    got, got_sum = add_rms_norm(x, norm.weight, norm.eps, residual)
    want, want_sum = norm(x, residual)
    assert close(got_sum, want_sum, dtype) and close(got, want, dtype)
    norm.fused = True  # the module's own switch reaches the kernel
    assert torch.equal(norm(x, residual)[0], got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim, q_heads, kv_heads", [(16, 4, 2), (64, 14, 2), (128, 7, 1)])
def test_rotary_over_views_of_qkv_equals_torch(head_dim, q_heads, kv_heads, dtype):
    torch.manual_seed(head_dim)
    rope = RotaryEmbedding(head_dim, 4096, 1e6)
    positions = torch.tensor([0, 1, 17, 500, 4095])
    table = rope.table(positions, dtype)
    qkv = torch.randn(len(positions), q_heads + 2 * kv_heads, head_dim).to(dtype)
    q, k, _ = qkv.split([q_heads, kv_heads, kv_heads], 1)  # as the model passes them: strided views
    assert not q.is_contiguous() and not k.is_contiguous()
    want = apply_rotary(table, q, k)
    got = rotary(table, q, k)
    assert all(close(g, w, dtype) for g, w in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(apply_rotary(table, q, k, fused=True), got))
    assert (want[0] - q).abs().max() > 0.1 and (want[1] - k).abs().max() > 0.1  # positions > 0 rotate


def test_rotary_keeps_torch_for_head_dims_the_kernel_cannot_tile():
    rope = RotaryEmbedding(80, 64, 1e4)  # half 40: not a power of two
    table, q, k = rope.table(torch.arange(3), torch.float32), torch.randn(3, 2, 80), torch.randn(3, 1, 80)
    assert all(torch.equal(a, b) for a, b in zip(apply_rotary(table, q, k, fused=True), apply_rotary(table, q, k)))
