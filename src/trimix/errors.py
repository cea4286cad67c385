"""Exceptions that carry a message meant for the user.

Everything the CLI reports without a traceback derives from :class:`TrimixError`. Each subclass is
also a ``ValueError`` so library users can catch the usual builtin.
"""

from __future__ import annotations


class TrimixError(ValueError):
    """A problem with the user's input: the message names the thing, the value and the fix."""


class ConfigError(TrimixError):
    """An invalid configuration value or combination of values."""


class SourceLoadError(TrimixError):
    """A model source could not be found or loaded."""


class VocabularyMismatchError(TrimixError):
    """The sources' tokenizers or output layers do not describe the same vocabulary."""


class DataError(TrimixError):
    """A data file (prompts, corpus, task data) is missing or malformed."""


class Interrupted(TrimixError):
    """The user stopped a run (Ctrl-C, SIGTERM) after its work so far was saved; the CLI exits 130."""
