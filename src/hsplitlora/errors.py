"""Errors meant for the user: one clear sentence, shown without a traceback (CLI exit status 2)."""


class UsageError(ValueError):
    """A bad value given by the user: the message names the value and what would be valid."""


def read_text(path, what: str = "file") -> str:
    """A text file a user gave or a run wrote, as UTF-8; one sentence naming it when it is missing
    or unreadable."""
    from pathlib import Path

    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{what} {path} cannot be read as UTF-8 text ({error.__class__.__name__}).") from None
