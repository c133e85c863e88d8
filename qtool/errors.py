"""The one exception users see."""


class QtoolError(Exception):
    """An error the user can act on: printed by the CLI as one line, exit code 2."""
