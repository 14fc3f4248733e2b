"""Name -> linear method of each weight format msModelSlim writes (the description file's names)."""

from __future__ import annotations

from atb_llm.quantization.base import QuantMethod
from atb_llm.quantization.w4a16 import W4A16Method
from atb_llm.quantization.w8a8 import W8A8DynamicMethod, W8A8Method, W8A8SMethod
from atb_llm.quantization.w8a16 import W8A16Method

METHODS: dict[str, type[QuantMethod]] = {
    "W8A16": W8A16Method,
    "W4A16": W4A16Method,
    "W8A8": W8A8Method,
    "W8A8_DYNAMIC": W8A8DynamicMethod,
    "W8A8S": W8A8SMethod,
}


def make_method(kind: str, group_size: int = 0, from_float: bool = False, gpu_gemms: bool | None = None) -> QuantMethod:
    """kind: a description type (W8A16, ...); group_size: the checkpoint's (0 = per channel);
    gpu_gemms: see QuantMethod."""
    try:
        cls = METHODS[kind]
    except KeyError:
        raise ValueError(f"quantization type {kind!r} has no linear method; supported: {', '.join(METHODS)}") from None
    return cls(group_size=group_size, from_float=from_float, gpu_gemms=gpu_gemms)
