"""What every command-line entry point shares."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run_main(main: Callable[[], object], prog: str) -> None:
    """Run `main`; an error of the user's making (a bad value, a missing or damaged file: the engine
    raises ValueError / OSError with a message naming the value and the fix) ends the command
    with that message and exit status 2, not a traceback."""
    try:
        main()
    except (ValueError, OSError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
