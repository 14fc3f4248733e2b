import pytest

from atb_llm.layers.attention.selector import get_backend
from atb_llm.layers.attention.torch_backend import TorchBackend


def test_cpu_gets_the_torch_backend():
    assert isinstance(get_backend("cpu"), TorchBackend)


def test_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match="device='meta' has no attention backend; use cpu, cuda or npu"):
        get_backend("meta")


def test_npu_without_torch_npu_says_what_to_install():
    pytest.importorskip("torch")
    try:
        import torch_npu  # noqa: F401

        pytest.skip("torch_npu is installed here")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="device=npu needs torch_npu"):
        get_backend("npu")
