"""The one exception type headwise raises for bad input.

The command line turns a :class:`HeadwiseError` into a one-line message and exit code 2, never a traceback.
Library users can catch it to tell "you asked for something impossible" from a bug.
"""


class HeadwiseError(ValueError):
    """Bad input or a missing prerequisite, with a message that says how to fix it."""
