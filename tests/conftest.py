import os
import sys
from pathlib import Path

# Triton's kernels run on CPU tensors under its interpreter: set before any kernel is defined. A
# machine with a GPU can run the suite with TRITON_INTERPRET=0 to compile them for real.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The default model folder (provisioned by setup.sh; provisioned here if missing)."""
    from atb_llm.utils.default_model import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """tiny_models(tie=False, ...) -> folder of a tiny random Qwen2, built once per variant."""
    from tiny import build_tiny_qwen2

    cache = {}

    def get(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            cache[key] = build_tiny_qwen2(tmp_path_factory.mktemp("tiny"), **kw)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny(tiny_models) -> Path:
    """The tiny random Qwen2 of the default shapes (fp32)."""
    return tiny_models()


@pytest.fixture(scope="session")
def float_model(tmp_path_factory):
    from tiny import build_tiny_qwen2

    # hidden 256, intermediate 512: W4A16 groups of 128 give 2 and 4 groups per row
    return build_tiny_qwen2(tmp_path_factory.mktemp("float"), hidden=256, dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def quantized(float_model, tmp_path_factory):
    """quantized(variant) -> folder written by msModelSlim, made once per variant."""
    from tiny import QUANT_KINDS

    from atb_llm.entrypoints.convert_quant_weight import convert

    made = {}

    def get(variant):
        if variant not in made:
            kind, group = QUANT_KINDS[variant]
            dst = tmp_path_factory.mktemp("q") / variant
            made[variant] = convert(float_model, dst, kind, None, 2, "cpu", group)
        return made[variant]

    return get


def pytest_collection_modifyitems(items):
    """Every test that loads the default model or runs msModelSlim is `slow` (besides the long ones
    marked in their files): `pytest -m "not slow"` is the inner loop, on tiny models only."""
    for item in items:
        if {"default_model", "quantized"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
