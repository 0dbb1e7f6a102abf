"""The one error hierarchy of FeatAug.

Every failure a user can cause is a :class:`FeatAugError`; its message is one line that names the
file or config key and the problem, and the command line prints it as
``feataug COMMAND: error: MESSAGE`` without a traceback. The library layers raise the four kinds
below; ``transfer`` and ``feataug`` subclass them for their own stages.
"""

from __future__ import annotations


class FeatAugError(Exception):
    """Base class: a one-line, user-facing failure."""


class ConfigError(FeatAugError, ValueError):
    """A config file, key, value or command-line override that cannot work."""


class DataError(FeatAugError):
    """A dataset that cannot be fetched, read or converted."""


class CheckpointError(FeatAugError):
    """A checkpoint or weights file that cannot be read, is refused, or does not fit."""


class TrainingError(FeatAugError):
    """A run that had to stop (a non-finite loss or weights)."""


def reason(e: BaseException, limit: int = 240, *, with_type: bool = False) -> str:
    """``e``'s message on one line (a KeyError's key without its quotes), at most ``limit``
    characters; the exception's type name when it has no message (or, ``with_type``, first)."""
    msg = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else e
    text = " ".join(str(msg).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    if not text:
        return type(e).__name__
    return f"{type(e).__name__}: {text}" if with_type else text
