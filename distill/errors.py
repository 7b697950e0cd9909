"""The one exception type for mistakes a user can fix (bad path, bad config, bad file).

The CLI prints its message on one line and exits with code 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported without a traceback. The message names the file/key at fault."""
