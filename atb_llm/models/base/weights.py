"""The safetensors files of a Hugging Face model folder: one file, or shards named by an index."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from atb_llm.config import read_json

INDEX_NAMES = ("model.safetensors.index.json", "quant_model_weights.safetensors.index.json")  # float, msModelSlim


class WeightFiles:
    """Lists and checks the shards up front, then streams (name, tensor) pairs."""

    def __init__(self, weight_dir: str | Path):
        self.weight_dir = Path(weight_dir)
        if not self.weight_dir.is_dir():
            raise FileNotFoundError(f"weight directory {str(self.weight_dir)!r} does not exist")
        index = next((self.weight_dir / n for n in INDEX_NAMES if (self.weight_dir / n).is_file()), None)
        if index is not None:
            weight_map = read_json(index, "download it again with the checkpoint").get("weight_map", {})
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.weight_dir / n).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{index} names shard(s) {missing} that are not in {self.weight_dir}; "
                    "download every shard of the checkpoint"
                )
            self.files = [self.weight_dir / n for n in names]
        else:
            self.files = sorted(self.weight_dir.glob("*.safetensors"))
        if not self.files:
            raise FileNotFoundError(
                f"no *.safetensors in {self.weight_dir}; the engine loads Hugging Face safetensors checkpoints"
            )
        for f in self.files:  # the header names every tensor's byte range: a truncated file fails here
            try:
                with safe_open(str(f), framework="pt"):
                    pass
            except Exception as err:  # safetensors raises its own SafetensorError
                raise ValueError(
                    f"{f} cannot be read as safetensors ({err}); the file is truncated or damaged: "
                    "download or convert it again"
                ) from None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for f in self.files:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    yield name, sf.get_tensor(name)
