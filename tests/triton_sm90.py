"""Compiles the Triton kernels to PTX and a cubin for an H100 (sm_90) on a machine without a GPU:
the interpreter runs kernels without compiling them, so this catches what only the compiler
rejects. Run with TRITON_INTERPRET unset (test_triton_backend.py starts it in a subprocess)."""

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from atb_llm.layers import triton_ops as O
from atb_llm.layers.attention import triton_kernels as K
from atb_llm.layers.attention.triton_backend import tile_size
from atb_llm.quantization import triton_gemm as G

SCALARS = {"qk_scale": "fp32", "eps": "fp32"}  # every other non-pointer argument is an i32 (ids, slots, strides)


def compile_sm90(fn, pointers: dict[str, str], constexprs: dict, num_warps: int) -> str:
    sig = {n: "constexpr" if n in constexprs else pointers.get(n) or SCALARS.get(n, "i32") for n in fn.arg_names}
    compiled = triton.compile(
        ASTSource(fn, sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}
    )
    assert compiled.asm["cubin"], f"{fn.__name__}: no cubin"
    return compiled.asm["ptx"]


def pool_pointers(model: str, int8: bool, names: tuple[str, str, str, str]) -> dict[str, str]:
    data = "*i8" if int8 else f"*{model}"
    scale = "*fp32" if int8 else data
    return dict(zip(names, (data, data, scale, scale)))


def main() -> None:
    n = 0
    for model, int8, comp, split, gq, d, bs in [
        ("bf16", False, False, False, 7, 128, 128),
        ("bf16", True, True, True, 7, 128, 128),
        ("fp32", False, True, True, 2, 64, 48),
    ]:
        ptrs = {p: f"*{model}" for p in ("q_ptr", "out_ptr")}
        ptrs |= pool_pointers(model, int8, ("k_ptr", "v_ptr", "ks_ptr", "vs_ptr"))
        ptrs |= {"tables_ptr": "*i64", "groups_ptr": "*i64", "read_len_ptr": "*i32", "evicted_ptr": "*i32"}
        ptrs |= {p: "*fp32" for p in ("m_ptr", "l_ptr", "acc_ptr")}
        consts = dict(GQ=gq, GQ_PAD=16, D=d, D_PAD=d, BLOCK_SIZE=bs, TILE=tile_size(bs, d), INT8=int8)
        consts |= dict(HAS_COMP=comp, SPLIT=split, PRECISION="ieee" if model == "fp32" else "tf32")
        compile_sm90(K.decode_kernel, ptrs, consts, num_warps=4)
        n += 1
    ptrs = {"out_ptr": "*bf16", "groups_ptr": "*i64"} | {p: "*fp32" for p in ("m_ptr", "l_ptr", "acc_ptr")}
    compile_sm90(K.combine_kernel, ptrs, dict(GQ=7, D=128, D_PAD=128, S_PAD=64), num_warps=1)
    n += 1
    for int8, comp, rope in [(False, False, False), (True, True, False), (True, True, True), (False, False, True)]:
        ptrs = {"k_ptr": "*bf16", "v_ptr": "*bf16"} | pool_pointers(
            "bf16", int8, ("kc_ptr", "vc_ptr", "ks_ptr", "vs_ptr")
        )
        ptrs |= {"slots_ptr": "*i64", "groups_ptr": "*i64", "tables_ptr": "*i64", "evicted_ptr": "*i32"}
        ptrs |= {p: "*bf16" for p in ("q_ptr", "qo_ptr", "cos_ptr", "sin_ptr")}
        consts = dict(D=128, D_PAD=128, BLOCK_SIZE=128, INT8=int8, COMP=comp, ROPE=rope, GQ=7, GQ_PAD=8)
        ptx = compile_sm90(K.store_kernel, ptrs, consts, 1)
        if int8:  # IEEE division and the add/subtract rounding survive compilation
            assert "div.rn.f32" in ptx and "0f4B400000" in ptx and "0fCB400000" in ptx, "int8 rounding changed"
        if comp:
            assert "bar.sync" in ptx or "barrier.sync" in ptx, "no barrier between the fold and the write"
        n += 1
    for model, int4, bm in [("bf16", False, 16), ("bf16", True, 64), ("fp32", True, 16)]:
        ptrs = {"x_ptr": f"*{model}", "w_ptr": "*i8", "s_ptr": "*fp32", "z_ptr": "*fp32", "b_ptr": f"*{model}"}
        ptrs |= {"y_ptr": f"*{model}"}
        consts = dict(GROUP=128, INT4=int4, HAS_BIAS=True, PRECISION="ieee" if model == "fp32" else "tf32")
        compile_sm90(G.wq_matmul_kernel, ptrs, consts | dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=64), num_warps=4)
        n += 1
    for model in ("bf16", "fp32"):
        ptrs = {p: f"*{model}" for p in ("x_ptr", "r_ptr", "w_ptr", "out_ptr", "sum_ptr")}
        compile_sm90(O.add_rms_norm_kernel, ptrs, dict(HAS_RES=True, BLOCK=4096), num_warps=8)
        ptrs = {p: f"*{model}" for p in ("q_ptr", "k_ptr", "cos_ptr", "sin_ptr", "qo_ptr", "ko_ptr")}
        compile_sm90(O.rotary_kernel, ptrs, dict(HALF=64, BLOCK_Q=32, BLOCK_K=4), num_warps=4)
        n += 2
    print(f"compiled {n} kernels for sm_90")


if __name__ == "__main__":
    main()
