"""Errors meant for the user: one clear sentence, shown without a traceback (CLI exit status 2)."""


class UsageError(ValueError):
    """A bad value given by the user: the message names the value and what would be valid."""
