"""What a checkpoint folder says about its quantization, and which `LinearMethod` each linear gets.

msModelSlim writes `quant_model_description.json` beside the weights: a flat map tensor name ->
`FLOAT | W8A16 | W8A8 | W8A8_DYNAMIC | W8A8S | W4A16 | C8`, plus `model_quant_type`, `group_size` and, for a
quantized KV cache, `kv_quant_type`. config.json is copied unchanged; MindIE's README has the user
add `"quantize": "w8a8"`, and when it is absent `model_quant_type` decides (as MindIE's router does).
`--quantize w8a16|w4a16` instead quantizes a float folder at load (round to nearest, no calibration).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from atb_llm.config import read_json
from atb_llm.layers.linear import LinearMethod
from atb_llm.quantization.methods import METHODS, make_method

DESCRIPTION_NAME = "quant_model_description.json"
LINEAR_TYPES = ("FLOAT", *METHODS)  # what a linear's weight may be
KV_TYPES = ("C8",)
ON_LOAD = ("w8a16", "w4a16")  # formats --quantize can make from a float folder
RTN_GROUP_SIZE = 128


@dataclass(frozen=True)
class QuantDescription:
    """The parsed description file. types: tensor name -> type."""

    path: Path
    model_quant_type: str
    group_size: int
    kv_quant_type: str | None
    types: dict[str, str] = field(repr=False)

    @classmethod
    def read(cls, weight_dir: str | Path) -> QuantDescription | None:
        path = Path(weight_dir) / DESCRIPTION_NAME
        if not path.is_file():
            return None
        raw = read_json(path, "re-export the checkpoint with msModelSlim")
        types = {k: v for k, v in raw.items() if isinstance(v, str) and "." in k}
        mqt = str(raw.get("model_quant_type", "")).upper()
        if mqt == "W8A8SC" or "W8A8SC" in types.values():
            raise ValueError(
                f"{path}: W8A8SC is the output of Ascend's weight compressor, which only the NPU's kernels read; "
                "load the W8A8S checkpoint it was compressed from (convert_quant_weight.sh -type w8a8s)"
            )
        for name, kind in types.items():
            if kind not in LINEAR_TYPES + KV_TYPES:
                known = ", ".join(LINEAR_TYPES + KV_TYPES)
                raise ValueError(f"{path}: {name} has quantization type {kind!r}; the engine runs {known}")
        if mqt not in LINEAR_TYPES:
            raise ValueError(f"{path}: model_quant_type={mqt!r} is not one of {', '.join(LINEAR_TYPES)}")
        kv = raw.get("kv_quant_type") or raw.get("kv_cache_type")
        return cls(path, mqt, int(raw.get("group_size") or 0), kv, types)

    def type_of(self, weight_name: str) -> str:
        try:
            return self.types[weight_name]
        except KeyError:
            raise ValueError(
                f"{self.path} does not describe {weight_name}; the description and weights differ"
            ) from None


class QuantConfig:
    """Picks each linear's method by the Hugging Face name of its weight, and names the tensors the
    format adds to a checkpoint beyond the linears'."""

    # C8: each layer's per-channel K/V scales -> (the attention layer's parameter, shard): they smooth
    # the channels before the int8 cache (PagedAttention). The offsets are not used: the int8 cache
    # computes a scale per token and needs none.
    C8_NAMES = {"k_proj.kv_cache_scale": ("attn.kv_scale", "k"), "v_proj.kv_cache_scale": ("attn.kv_scale", "v")}
    ignored_weights = ("kv_cache_offset",)

    def __init__(self, description: QuantDescription | None = None, on_load: str | None = None):
        self.description, self.on_load = description, on_load
        self.gpu_gemms: bool | None = None  # the methods' kernels (see QuantMethod); the engine sets it
        self.lm_head: str | None = None  # w8a16 | w4a16: the LM head quantized at load (--quantize_lm_head)

    @property
    def name(self) -> str:
        if self.description is not None:
            return self.description.model_quant_type.lower()
        return self.on_load or "float"

    @property
    def kv_quant(self) -> str | None:
        return self.description.kv_quant_type if self.description else None

    @property
    def checkpoint_names(self) -> dict[str, tuple[str, str]]:
        """Checkpoint name fragment -> (model parameter fragment, shard) of the format's own tensors."""
        return self.C8_NAMES if self.kv_cache_scales else {}

    @property
    def kv_cache_scales(self) -> bool:
        """Whether the checkpoint has C8's per-channel K/V scales (`k_proj.kv_cache_scale`, ...)."""
        d = self.description
        return d is not None and any(n.endswith("kv_cache_scale") for n, t in d.types.items() if t == "C8")

    def lm_head_method(self) -> LinearMethod:
        """The LM head's: float as every checkpoint has it, or round to nearest at load."""
        if self.lm_head is None:
            return LinearMethod()
        return make_method(self.lm_head.upper(), RTN_GROUP_SIZE, from_float=True, gpu_gemms=self.gpu_gemms)

    def method(self, prefix: str, shards: tuple[str, ...] = ()) -> LinearMethod:
        """prefix: the module path (`model.layers.0.self_attn`); shards: the Hugging Face linears fused
        into this one (`q_proj`, `k_proj`, `v_proj`), or none for a single linear named by prefix."""
        if self.on_load is not None:
            return make_method(self.on_load.upper(), RTN_GROUP_SIZE, from_float=True, gpu_gemms=self.gpu_gemms)
        if self.description is None:
            return LinearMethod()
        names = [f"{prefix}.{s}.weight" for s in shards] or [f"{prefix}.weight"]
        kinds = {n: self.description.type_of(n) for n in names}
        if len(set(kinds.values())) > 1:
            raise ValueError(
                f"{self.description.path}: the projections fused into one linear must share a quantization "
                f"type, got {kinds}; quantize them alike (e.g. list all or none of them in disable_names)"
            )
        kind = next(iter(kinds.values()))
        return (
            LinearMethod()
            if kind == "FLOAT"
            else make_method(kind, self.description.group_size, gpu_gemms=self.gpu_gemms)
        )


def read_quant_config(weight_dir: str | Path, config_json: dict, on_load: str | None = None) -> QuantConfig:
    """The folder's quantization, checked against config.json's `quantize` and the `--quantize` flag."""
    desc = QuantDescription.read(weight_dir)
    declared = config_json.get("quantize")
    if desc is None:
        if declared not in (None, "", "float"):
            raise FileNotFoundError(
                f"config.json in {weight_dir} says quantize={declared!r} but {DESCRIPTION_NAME} is missing; "
                "copy the whole msModelSlim output folder, or remove `quantize` for a float checkpoint"
            )
        if on_load is not None and on_load not in ON_LOAD:
            raise ValueError(
                f"--quantize {on_load!r} is not supported; on-load quantization makes {', '.join(ON_LOAD)}"
            )
        return QuantConfig(on_load=on_load)
    if on_load is not None:
        raise ValueError(
            f"--quantize {on_load} asks to quantize at load, but {weight_dir} is already quantized "
            f"({desc.model_quant_type}); drop --quantize"
        )
    if declared not in (None, "") and str(declared).upper() != desc.model_quant_type:
        raise ValueError(
            f"config.json in {weight_dir} says quantize={declared!r} but {DESCRIPTION_NAME} says "
            f"model_quant_type={desc.model_quant_type!r}; set quantize to {desc.model_quant_type.lower()!r}"
        )
    return QuantConfig(desc)
