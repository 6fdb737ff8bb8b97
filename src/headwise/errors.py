"""The one exception type headwise raises for bad input.

The command line turns a :class:`HeadwiseError` into a one-line message and exit code 2, never a traceback.
Library users can catch it to tell "you asked for something impossible" from a bug; scripts run their
``main`` through :func:`run_cli` to get the same one-line errors.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class HeadwiseError(ValueError):
    """Bad input or a missing prerequisite, with a message that says how to fix it."""


def run_cli(main: Callable[[], object], prog: str) -> int:
    """Run ``main``; a :class:`HeadwiseError` becomes ``PROG: error: MESSAGE`` on stderr and exit code 2."""
    try:
        main()
    except HeadwiseError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0
