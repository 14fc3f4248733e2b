"""Quantized checkpoints written by msModelSlim itself (run here on the CPU on a tiny random Qwen2),
read through the engine's linear methods and compared with fp32 references computed in this file
from the raw tensors: the format (packing, offsets, scales), each kernel, and whole-model logits."""

import importlib.util
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from quant_reference import dequantized_copy, reference_weight, tensors
from safetensors.torch import load_file, save_file
from tiny import QUANT_KINDS as KINDS
from tiny import build_tiny_qwen2

from atb_llm.entrypoints.convert_quant_weight import convert
from atb_llm.layers.linear import LinearMethod
from atb_llm.quantization.w4a16 import quantize_w4_groups
from atb_llm.quantization.w8a8 import deq_scale_as_float
from atb_llm.quantization.w8a16 import quantize_w8_per_channel
from atb_llm.runtime.engine import EngineConfig, LLMEngine
from atb_llm.runtime.sequence import SamplingParams

# msmodelslim runs in a subprocess only: importing it here would patch pydantic for the whole
# test session (it turns validation errors into its own exception type)
if importlib.util.find_spec("msmodelslim") is None:
    pytest.skip("pip install msmodelslim==26.1.0 (setup.sh does)", allow_module_level=True)

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
LINEARS += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
PROMPT = list(range(5, 45))


def reference_linear(t, names, kind, x):
    """fp32 output of the (fused) linears `names` for input x [M, K]."""
    outs = []
    for name in names:
        w = reference_weight(t, name, *KINDS[kind]) if f"{name}.weight_scale" in t else t[f"{name}.weight"].float()
        bias = t.get(f"{name}.bias")
        if kind in ("w8a8", "w8a8s") and f"{name}.quant_bias" in t:
            xq = torch.clamp(
                torch.round(x / t[f"{name}.input_scale"].float()) + t[f"{name}.input_offset"].float(), -128, 127
            )
            acc = xq @ t[f"{name}.weight"].float().T + t[f"{name}.quant_bias"].float()
            outs.append(acc * deq_scale_as_float(t[f"{name}.deq_scale"]))
            continue
        if kind == "w8a8_dynamic" and f"{name}.weight_scale" in t:
            s = x.abs().amax(-1, keepdim=True) / 127
            w = t[f"{name}.weight"].float() * t[f"{name}.weight_scale"].float()
            x_used = torch.round(x / s).clamp(-127, 127) * s
        else:
            x_used = x
        outs.append(x_used @ w.T + (bias.float() if bias is not None else 0))
    return torch.cat(outs, -1)


def engine(path, **kw):
    return LLMEngine(
        EngineConfig(str(path), block_size=16, max_input_length=64, max_output_length=8, progress=False, **kw)
    )


def prompt_logits(eng):
    eng.add_request(PROMPT, SamplingParams(max_tokens=1))
    seqs, is_prefill = eng.scheduler.schedule()
    return eng.runner.logits(seqs, is_prefill)[0]


@pytest.mark.parametrize("variant", KINDS)
def test_checkpoint_dequantizes_to_the_float_weights(float_model, quantized, variant):
    kind, group = KINDS[variant]
    folder = quantized(variant)
    desc = json.loads((folder / "quant_model_description.json").read_text())
    assert desc["model_quant_type"] == kind.upper()
    assert json.loads((folder / "config.json").read_text())["quantize"] == kind
    t, orig = tensors(folder), tensors(float_model)
    for name in (f"model.layers.1.{lin}" for lin in LINEARS):
        if kind.startswith("w8a8") and name.endswith("down_proj"):  # disable_names: every down_proj stays float
            assert desc[f"{name}.weight"] == "FLOAT" and t[f"{name}.weight"].dtype == torch.bfloat16
            continue
        assert desc[f"{name}.weight"] == kind.upper()
        if kind == "w8a8s":  # W = q * deq_scale / input_scale; 4-bit values but outliers, some pruned to 0
            q, ref = t[f"{name}.weight"].float(), orig[f"{name}.weight"].float()
            step = (deq_scale_as_float(t[f"{name}.deq_scale"]) / t[f"{name}.input_scale"].float())[:, None]
            assert torch.all((q * step - ref).abs() <= step * 0.6), name  # half a step, measured 0.53 at most
            assert (q.abs() <= 7).float().mean() > 0.95 and (q == 0).float().mean() > 0.05  # 4-bit, sparse
            continue
        w, ref = reference_weight(t, name, kind, group), orig[f"{name}.weight"].float()
        scale = t[f"{name}.weight_scale"].float()
        step = scale.repeat_interleave(w.shape[1] // scale.shape[1], 1)
        # half a step of rounding, plus the bf16 rounding of a stored scale times up to 127 levels
        assert torch.all((w - ref).abs() <= step * 0.8), name


# bf16: torch's int kernels; fp32: W8A16 decode rows (<= 16) and W4A16 in the int kernels on bf16
# activations, W8A16 prefill rows dequantize + fp32 matmul
@pytest.mark.parametrize("rows", [7, 40])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("variant", KINDS)
def test_linear_methods_equal_the_fp32_reference(quantized, variant, dtype, rows):
    check_linears(quantized(variant), variant, dtype, rows)


def check_linears(folder, variant, dtype, rows):
    """Each linear of layer 0 against the fp32 product on the checkpoint's weights, by the format's formulas."""
    t, model = tensors(folder), engine(folder, dtype=dtype).model
    layer = model.model.layers[0]
    pre = "model.layers.0"
    torch.manual_seed(0)
    cases = [
        (layer.self_attn.qkv_proj, [f"{pre}.self_attn.{p}_proj" for p in "qkv"]),
        (layer.self_attn.o_proj, [f"{pre}.self_attn.o_proj"]),
        (layer.mlp.gate_up_proj, [f"{pre}.mlp.gate_proj", f"{pre}.mlp.up_proj"]),
        (layer.mlp.down_proj, [f"{pre}.mlp.down_proj"]),
    ]
    for module, names in cases:
        x = torch.randn(rows, module.input_size).to(module.dtype)
        got = module(x).float()
        want = reference_linear(t, names, variant, x.float())
        exact = variant == "w8a16" and rows > 16  # fp32 all the way
        tol = 1e-5 if dtype == "fp32" and exact else 0.02
        assert (got - want).abs().max() <= tol * want.abs().max(), names[0]


def asymmetric(t):
    """Every W8A16 linear quantized again with a per-channel offset (msModelSlim's w_sym: false):
    W = (q - offset) * scale, q spanning all of [-128, 127]."""
    for key in [k for k in t if k.endswith(".weight_offset")]:
        name = key.removesuffix(".weight_offset")
        w = reference_weight(t, name, "w8a16", 0)
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        scale = ((hi - lo) / 255).clamp(min=1e-8)
        offset = torch.round(-128 - lo / scale)
        t[f"{name}.weight"] = torch.round(w / scale + offset).clamp(-128, 127).to(torch.int8)
        t[f"{name}.weight_scale"] = scale.to(t[f"{name}.weight_scale"].dtype)
        t[f"{name}.weight_offset"] = offset.to(t[f"{name}.weight_offset"].dtype)


@pytest.fixture(scope="module")
def asymmetric_w8a16(quantized, tmp_path_factory):
    folder = edited_copy(quantized("w8a16"), tmp_path_factory.mktemp("asym") / "w8a16", tensor_edit=asymmetric)
    offsets = [v for k, v in tensors(folder).items() if k.endswith(".weight_offset")]
    assert all(o.abs().max() > 0 for o in offsets)  # every linear has offsets: the offset term runs
    return folder


@pytest.mark.parametrize("rows", [7, 40])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_asymmetric_w8a16_equals_the_fp32_reference(asymmetric_w8a16, dtype, rows):
    check_linears(asymmetric_w8a16, "w8a16", dtype, rows)


def test_asymmetric_w8a16_model_equals_its_dequantized_float_model(float_model, asymmetric_w8a16, tmp_path):
    dequant = dequantized_copy(float_model, asymmetric_w8a16, "w8a16", tmp_path / "dequant")
    got, want = prompt_logits(engine(asymmetric_w8a16, dtype="fp32")), prompt_logits(engine(dequant, dtype="fp32"))
    assert (got - want).abs().max() < 1e-3 * want.abs().max() and got.argmax() == want.argmax()


@pytest.mark.parametrize("variant", ["w8a16", "w4a16", "w4a16_per_channel"])
def test_weight_only_model_equals_its_dequantized_float_model(float_model, quantized, variant, tmp_path):
    """The whole model on int8/int4 weights against the float engine on the dequantized weights, both in
    fp32. W8A16 prefill dequantizes into fp32 products, so only the summation order differs; W4A16
    runs the int4 kernel on bf16 activations, so its logits carry the activations' rounding."""
    folder = quantized(variant)
    dequant = dequantized_copy(float_model, folder, variant, tmp_path / "dequant")
    got, want = prompt_logits(engine(folder, dtype="fp32")), prompt_logits(engine(dequant, dtype="fp32"))
    exact = variant == "w8a16"
    assert F.cosine_similarity(got, want, dim=0) > (0.99999 if exact else 0.999)
    assert (got - want).abs().max() < (1e-3 if exact else 0.1) * want.abs().max()
    if exact:
        assert got.argmax() == want.argmax()


def test_w8a8s_model_stays_near_its_dequantized_float_model(float_model, quantized, tmp_path):
    """The sparse checkpoint's whole model against the float engine on its dequantized weights
    (q * deq_scale / input_scale): only the 8-bit activations differ. Against the original float
    weights, 4-bit values on a random model are far off (cosine 0.80 measured) by design."""
    folder = quantized("w8a8s")
    t = tensors(folder)
    dst = shutil.copytree(float_model, tmp_path / "dequant")
    weights = load_file(str(dst / "model.safetensors"))
    for name in [n for n in weights if f"{n.removesuffix('.weight')}.deq_scale" in t]:
        base = name.removesuffix(".weight")
        step = deq_scale_as_float(t[f"{base}.deq_scale"]) / t[f"{base}.input_scale"].float()
        weights[name] = (t[name].float() * step[:, None]).to(weights[name].dtype)
    save_file(weights, str(dst / "model.safetensors"))
    got, want = prompt_logits(engine(folder)), prompt_logits(engine(dst))
    assert F.cosine_similarity(got, want, dim=0) > 0.98


@pytest.mark.parametrize("variant", ["w8a8", "w8a8_dynamic"])
def test_activation_quantized_model_stays_near_float(float_model, quantized, variant):
    got, want = prompt_logits(engine(quantized(variant))), prompt_logits(engine(float_model))
    assert F.cosine_similarity(got, want, dim=0) > 0.98  # 8-bit activations of a random model (~0.99 seen)


@pytest.mark.slow  # runs msModelSlim
def test_fp32_checkpoint_stores_deq_scale_as_float_bits(tmp_path):
    src = build_tiny_qwen2(tmp_path / "fp32", hidden=128, dtype=torch.float32)
    folder = convert(src, tmp_path / "w8a8", "w8a8", None, 2, "cpu")
    t = tensors(folder)
    deq = t["model.layers.0.self_attn.q_proj.deq_scale"]
    assert deq.dtype == torch.int64
    scale = deq_scale_as_float(deq)
    assert torch.all(scale > 0) and torch.all(scale < 1)  # bits read as fp32, not the integer value
    layer = engine(folder).model.model.layers[0]
    x = torch.randn(3, 128)
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    want = reference_linear(t, names, "w8a8", x)
    assert (layer.self_attn.qkv_proj(x) - want).abs().max() <= 0.02 * want.abs().max()


@pytest.mark.parametrize("kind", ["w8a16", "w4a16"])
def test_quantize_at_load_from_a_float_folder(float_model, kind):
    eng = engine(float_model, quantize=kind)
    assert eng.quant.name == kind
    w = tensors(float_model)["model.layers.0.mlp.down_proj.weight"].float()
    x = torch.randn(4, w.shape[1]).to(torch.bfloat16)
    got = eng.model.model.layers[0].mlp.down_proj(x).float()
    want = x.float() @ w.T
    tol = 0.02 if kind == "w8a16" else 0.2  # round to nearest: int8 per channel, int4 per group of 128
    assert (got - want).abs().max() <= tol * want.abs().max()
    gen = eng.generate([PROMPT], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(gen.token_ids) == 4


@pytest.mark.parametrize("kind", ["w8a16", "w4a16"])
def test_the_lm_head_quantized_at_load_equals_its_rounded_weight(float_model, kind):
    """--quantize_lm_head: the head's logits are those of its weight rounded to nearest (int8 per
    vocabulary row; int4 per group of 128), the kernels' bf16 activations aside; the linears stay float."""
    w = tensors(float_model)["lm_head.weight"].float()
    n, k = w.shape
    if kind == "w8a16":
        q, scale, offset = quantize_w8_per_channel(w)
        rounded = (q.float() - offset) * scale
    else:
        q, scale, offset = quantize_w4_groups(w, 128)
        rounded = ((q.float().view(n, -1, 128) - offset[..., None]) * scale[..., None]).view(n, k)
    eng = engine(float_model, dtype="fp32", quantize_lm_head=kind)
    assert eng.quant.name == "float" and type(eng.model.model.layers[0].mlp.down_proj.method) is LinearMethod
    hidden = torch.randn(6, k)
    got, want = eng.model.lm_head(hidden), hidden.bfloat16().float() @ rounded.T
    err = (got - want).abs().mean() / want.abs().mean()  # the output's bf16 rounding: about 0.2%
    err_float = (got - hidden @ w.T).abs().mean() / want.abs().mean()  # the weight's rounding: 0.75% int8, 10% int4
    assert err < 0.004 and err_float > 3 * err
    gen = eng.generate([PROMPT], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(gen.token_ids) == 4


def test_a_tied_lm_head_is_not_quantized(tmp_path):
    tied = build_tiny_qwen2(tmp_path / "tied", tie=True)
    with pytest.raises(ValueError, match="ties its LM head to the token embedding.*untied model"):
        engine(tied, quantize_lm_head="w8a16")
    with pytest.raises(ValueError, match="quantize_lm_head='int4' is not supported; use one of w8a16, w4a16"):
        EngineConfig(str(tied), quantize_lm_head="int4")


def test_c8_checkpoint_runs_every_group_in_int8(quantized, float_model, tmp_path):
    folder = convert(float_model, tmp_path / "c8", "w8a8c8", None, 2, "cpu")
    desc = json.loads((folder / "quant_model_description.json").read_text())
    assert desc["kv_quant_type"] == "C8"
    eng = engine(folder, dtype="fp32")
    assert all(level.int8 for level in eng.layout.levels)
    t = tensors(folder)
    for i, layer in enumerate(eng.model.model.layers):  # each layer's channel scales, keys' per rotary pair
        k, v = (t[f"model.layers.{i}.self_attn.{p}_proj.kv_cache_scale"].float().view(2, -1) for p in "kv")
        k = k.view(2, 2, -1)
        paired = (k[:, 0] ** 2 + k[:, 1] ** 2).sqrt()
        assert torch.allclose(layer.self_attn.attn.kv_scale[0], torch.cat([paired, paired], -1))
        assert torch.equal(layer.self_attn.attn.kv_scale[1], v)
    plain = engine(quantized("w8a8"), dtype="fp32")
    assert not any(level.int8 for level in plain.layout.levels)
    got, want = prompt_logits(eng), prompt_logits(plain)  # prefill attends over the prompt itself: same logits
    assert torch.allclose(got, want, atol=1e-3)
    a = eng.generate([PROMPT], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert len(a.token_ids) == 6
    assert eng.cache_manager.kv_cache.pools.keys() == {"int8"}


def edited_copy(src, dst, config=None, description=None, tensor_edit=None):
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text()) | config
        (dst / "config.json").write_text(json.dumps(cfg))
    if description:
        desc = json.loads((dst / "quant_model_description.json").read_text()) | description
        (dst / "quant_model_description.json").write_text(json.dumps(desc))
    if tensor_edit:
        f = next(dst.glob("*.safetensors"))
        t = load_file(str(f))
        tensor_edit(t)
        save_file(t, str(f))
    return dst


def test_bad_quantized_folders_name_the_problem(quantized, tmp_path):
    w8 = quantized("w8a16")
    missing = edited_copy(w8, tmp_path / "missing")
    (missing / "quant_model_description.json").unlink()
    with pytest.raises(FileNotFoundError, match="quantize='w8a16' but quant_model_description.json is missing"):
        engine(missing)
    with pytest.raises(ValueError, match="'W2A16'"):
        engine(edited_copy(w8, tmp_path / "unknown", description={"model.layers.0.mlp.up_proj.weight": "W2A16"}))
    with pytest.raises(ValueError, match="quantize='w4a16' but .* model_quant_type='W8A16'"):
        engine(edited_copy(w8, tmp_path / "disagree", config={"quantize": "w4a16"}))
    with pytest.raises(ValueError, match="must share a quantization type"):
        engine(edited_copy(w8, tmp_path / "mixed", description={"model.layers.0.self_attn.k_proj.weight": "FLOAT"}))

    def bad_shape(t):
        t["model.layers.1.mlp.down_proj.weight_scale"] = torch.ones(3, 1)

    with pytest.raises(ValueError, match=r"down_proj.weight_scale has shape \(3, 1\)"):
        engine(edited_copy(w8, tmp_path / "shape", tensor_edit=bad_shape))
    with pytest.raises(ValueError, match="already quantized"):
        engine(w8, quantize="w8a16")


def test_fused_shards_must_share_the_activation_scale(quantized, tmp_path):
    def split_scale(t):
        t["model.layers.0.self_attn.k_proj.input_scale"] = t["model.layers.0.self_attn.k_proj.input_scale"] * 2

    bad = edited_copy(quantized("w8a8"), tmp_path / "split", tensor_edit=split_scale)
    with pytest.raises(ValueError, match=r"self_attn\.[qv]_proj\.input_scale = .* differs from shard 'k'"):
        engine(bad)


@pytest.mark.parametrize("variant", ["w4a16", "w8a16"])
def test_all_zero_group_is_read_as_zero_not_nan(quantized, variant, tmp_path):
    """msModelSlim writes a group of all-zero weights as scale 0, offset NaN (seen on the default
    model's layer 2 down_proj in W4A16)."""
    name = "model.layers.0.mlp.down_proj"

    def zero_group(t):
        t[f"{name}.weight_scale"][3, 0] = 0.0
        t[f"{name}.weight_offset"][3, 0] = float("nan")

    folder = edited_copy(quantized(variant), tmp_path / "zero", tensor_edit=zero_group)
    down = engine(folder).model.model.layers[0].mlp.down_proj
    x = torch.randn(2, down.input_size).to(torch.bfloat16)
    got = down(x).float()
    assert torch.isfinite(got).all()
    t = tensors(folder)
    w = reference_weight(t, name, *KINDS[variant]).nan_to_num(0.0)  # the group reads as zeros
    assert (got - x.float() @ w.T).abs().max() <= 0.02 * got.abs().max()


def test_w8a8sc_is_refused_with_the_format_to_use(quantized, tmp_path, monkeypatch):
    """W8A8SC (the NPU compressor's output) names what to load instead, at convert and at load; the
    zoo's spellings of the sparse type convert as w8a8s."""
    from atb_llm.entrypoints import convert_quant_weight

    with pytest.raises(SystemExit, match="use -type w8a8s"):
        convert_quant_weight.main(["-src", str(tmp_path), "-dst", str(tmp_path / "o"), "-type", "w8a8sc"])
    seen = []
    monkeypatch.setattr(convert_quant_weight, "ensure_msmodelslim", lambda install: None)
    monkeypatch.setattr(convert_quant_weight, "convert", lambda src, dst, kind, *a: seen.append(kind) or dst)
    for spelling in ("qwencode_w8a8s", "qwen_w8a8s", "w8a8s"):
        convert_quant_weight.main(["-src", str(tmp_path), "-dst", str(tmp_path / "o"), "-type", spelling])
    assert seen == ["w8a8s"] * 3
    sc = edited_copy(quantized("w8a8s"), tmp_path / "sc", {"quantize": "w8a8sc"}, {"model_quant_type": "W8A8SC"})
    with pytest.raises(ValueError, match="W8A8SC is the output of Ascend's weight compressor.*-type w8a8s"):
        engine(sc)
