"""The one exception type for mistakes a user can fix (bad input, bad config, bad folder)."""


class UserError(Exception):
    """A problem in what the user gave us. The CLI prints its message as one line and exits with code 2."""
