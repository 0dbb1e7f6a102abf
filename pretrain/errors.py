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
