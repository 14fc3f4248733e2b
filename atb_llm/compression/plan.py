"""MLGC plans: the level of every group, in a small JSON file beside the weights (mlgc_plan.json).

A plan names the model it was made for (config hash, layer and KV-head counts) and the block size
its windows were aligned to; loading checks both, so a plan never silently meets the wrong model.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from atb_llm.compression.layout import GroupLayout
from atb_llm.compression.levels import LEVELS, Level, Window, make_level
from atb_llm.config import ModelConfig, read_json

PLAN_NAME = "mlgc_plan.json"
FORMAT = "mlgc-plan/1"
CALIBRATE_HINT = "bash examples/models/qwen2_5_mlgc/calibrate.sh -m {model}"


def aligned_recent(sink: int, recent: int, block_size: int) -> int:
    """The recent window that fills the ring of ceil((sink + recent + 1) / block_size) blocks."""
    if sink < 0 or recent < 1:
        raise ValueError(f"sink={sink} must be >= 0 and recent={recent} >= 1")
    ring = math.ceil((sink + recent + 1) / block_size) * block_size
    return ring - sink - 1


@dataclass
class MlgcPlan:
    model_type: str
    config_hash: str
    num_layers: int
    num_kv_heads: int
    block_size: int
    sink: int
    recent: int  # aligned: sink + recent + 1 fills whole blocks
    levels: list[list[str]]  # [layer][kv_head] level names
    method: str = "razor"  # razor (calibrated) | streaming | random
    full_ratio: float | None = None
    scores: dict[str, list[list[float]]] = field(default_factory=dict)  # echo / induction, [layer][kv_head]
    calibration: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.levels) != self.num_layers or any(len(r) != self.num_kv_heads for r in self.levels):
            raise ValueError(f"plan levels must be a {self.num_layers} x {self.num_kv_heads} grid")
        unknown = {name for row in self.levels for name in row} - set(LEVELS)
        if unknown:
            raise ValueError(f"plan has unknown level(s) {sorted(unknown)}; levels are {sorted(LEVELS)}")

    # ---- file format ------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"format": FORMAT, **asdict(self)}, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> MlgcPlan:
        path, hint = Path(path), CALIBRATE_HINT.format(model="WEIGHT_DIR")
        if not path.is_file():
            raise FileNotFoundError(f"MLGC plan {path} does not exist; make one with {hint}")
        raw = read_json(path, f"make it again with {hint}")
        if not isinstance(raw, dict) or raw.pop("format", None) != FORMAT:
            raise ValueError(f"{path} is not an MLGC plan ({FORMAT}); make one with {hint}")
        try:
            return cls(**raw)
        except TypeError as err:  # a field missing or unknown
            raise ValueError(f"{path} is not a complete MLGC plan ({err}); make it again with {hint}") from None

    # ---- use ------------------------------------------------------------------------------
    def check(self, config: ModelConfig, block_size: int, where: str = "the plan") -> None:
        """Raise unless the plan was made for this model and block size."""
        if (self.num_layers, self.num_kv_heads) != (config.num_hidden_layers, config.num_key_value_heads):
            raise ValueError(
                f"{where} has {self.num_layers} layers x {self.num_kv_heads} KV heads = "
                f"{self.num_layers * self.num_kv_heads} groups, the model {config.num_hidden_layers} x "
                f"{config.num_key_value_heads} = {config.num_groups}; it was made for another model"
            )
        if self.config_hash != config.config_hash():
            raise ValueError(
                f"{where} was made for a model with config hash {self.config_hash}, this model's is "
                f"{config.config_hash()}; recalibrate with {CALIBRATE_HINT.format(model='WEIGHT_DIR')}"
            )
        if self.block_size != block_size:
            raise ValueError(
                f"{where} was aligned to block_size={self.block_size}; run with --block_size "
                f"{self.block_size} or recalibrate with --block_size {block_size}"
            )

    def level_objects(self) -> list[Level]:
        return [make_level(name, self.sink, self.recent) for row in self.levels for name in row]

    def to_layout(self) -> GroupLayout:
        return GroupLayout(self.num_layers, self.num_kv_heads, tuple(self.level_objects()))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.levels:
            for name in row:
                out[name] = out.get(name, 0) + 1
        return out


def select_full(scores: list[float], num_full: int) -> set[int]:
    """Indices of the `num_full` highest scores (ties broken by index, so plans are deterministic)."""
    order = sorted(range(len(scores)), key=lambda g: (-scores[g], g))
    return set(order[:num_full])


def plan_from_levels(
    config: ModelConfig,
    chosen: list[Level],
    block_size: int,
    sink: int,
    recent: int,
    method: str,
    full_ratio: float | None,
    **extra,
) -> MlgcPlan:
    """The plan whose group g (layer-major) takes chosen[g]."""
    h = config.num_key_value_heads
    if len(chosen) != config.num_groups:
        raise ValueError(f"{len(chosen)} levels for a model of {config.num_groups} groups")
    levels = [[chosen[layer * h + head].name for head in range(h)] for layer in range(config.num_hidden_layers)]
    return MlgcPlan(
        config.model_type,
        config.config_hash(),
        config.num_hidden_layers,
        h,
        block_size,
        sink,
        aligned_recent(sink, recent, block_size),
        levels,
        method,
        full_ratio,
        **extra,
    )


def plan_from_selection(
    config: ModelConfig,
    full: set[int],
    block_size: int,
    sink: int,
    recent: int,
    int8: bool,
    method: str,
    full_ratio: float | None,
    **extra,
) -> MlgcPlan:
    """The groups in `full` keep their whole history, the others a window (both int8 with `int8`)."""
    kept, window = Level(), Window(sink=sink, recent=recent)
    if int8:
        kept, window = kept.as_int8(), window.as_int8()
    chosen = [kept if g in full else window for g in range(config.num_groups)]
    return plan_from_levels(config, chosen, block_size, sink, recent, method, full_ratio, **extra)


def num_full_groups(config: ModelConfig, full_ratio: float) -> int:
    if not 0 <= full_ratio <= 1:
        raise ValueError(f"full_ratio={full_ratio} must be within [0, 1]")
    return round(full_ratio * config.num_groups)


def baseline_plan(
    kind: str,
    config: ModelConfig,
    block_size: int,
    sink: int = 64,
    recent: int = 1024,
    full_ratio: float = 0.25,
    int8: bool = False,
    seed: int = 0,
) -> MlgcPlan:
    """`streaming`: every group a window. `random`: the calibrated budget on random groups."""
    if kind == "streaming":
        return plan_from_selection(config, set(), block_size, sink, recent, int8, "streaming", 0.0)
    if kind == "random":
        chosen = random.Random(seed).sample(range(config.num_groups), num_full_groups(config, full_ratio))
        return plan_from_selection(
            config, set(chosen), block_size, sink, recent, int8, "random", full_ratio, calibration={"seed": seed}
        )
    raise ValueError(f"unknown baseline {kind!r}; baselines are streaming, random")


def resolve_layout(mlgc: str | None, model_path: str | Path, config: ModelConfig, block_size: int) -> GroupLayout:
    """--mlgc: off | auto (WEIGHT_DIR/mlgc_plan.json) | PLAN path | streaming | random."""
    mlgc = (mlgc or "off").strip()
    if mlgc == "off":
        return GroupLayout.uniform(config.num_hidden_layers, config.num_key_value_heads)
    if mlgc in ("streaming", "random"):
        return baseline_plan(mlgc, config, block_size).to_layout()
    path = Path(model_path) / PLAN_NAME if mlgc == "auto" else Path(mlgc)
    if not path.is_file():
        raise FileNotFoundError(
            f"no MLGC plan at {path}; make one with {CALIBRATE_HINT.format(model=model_path)} (or run with --mlgc off)"
        )
    plan = MlgcPlan.load(path)
    plan.check(config, block_size, where=str(path))
    return plan.to_layout()


def describe(layout: GroupLayout) -> str:
    """The plan as a layer x group grid of the levels' marks (F full, W window, f full_int8, w window_int8)."""
    lines = ["layer " + " ".join(f"g{h}" for h in range(layout.num_kv_heads))]
    for layer in range(layout.num_layers):
        row = [layout.level(layer, h).mark.rjust(2) for h in range(layout.num_kv_heads)]
        lines.append(f"{layer:5d} " + " ".join(row))
    windows = {lv for lv in layout.levels if isinstance(lv, Window)}
    if windows:
        lines.append("window: " + ", ".join(sorted(lv.describe() for lv in windows)))
    return "\n".join(lines)
