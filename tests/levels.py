"""The table every level test runs over, built from the level registry (as kvpress's tests run over
its default presses): a level registered in atb_llm.compression.levels is tested everywhere."""

from atb_llm.compression.levels import LEVELS, Level, make_level

LEVEL_NAMES = list(LEVELS)


def level_table(sink: int, recent: int) -> list[Level]:
    """Every registered level, window levels with this geometry."""
    return [make_level(name, sink, recent) for name in LEVEL_NAMES]
