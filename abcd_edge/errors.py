"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(ValueError):
    """Bad input from the user (a value, a path, a file): message names it and what is accepted."""
