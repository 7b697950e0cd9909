"""The one exception type for mistakes a user can fix (bad path, bad config, bad file).

The CLI prints its message on one line and exits with code 2; anything else is a bug and keeps its traceback.
"""

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's input, reported without a traceback. The message names the file/key at fault."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """ "; did you mean 'x'?" naming up to three close choices, or "" when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?" if close else ""
