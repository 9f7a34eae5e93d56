"""The one exception type meant for users: the CLI prints its message on one line and exits with code 2."""


class BitfluxError(Exception):
    """A problem with the user's input or environment, explained in one line."""
