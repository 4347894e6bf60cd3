"""The one error base class the CLI catches.

An :class:`AlignkitError` is a problem the user can act on (a bad config key, a malformed data line,
an unreachable server, a failed agreement gate): ``alignkit`` prints its message, without a
traceback, and exits with its ``exit_code``. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class AlignkitError(Exception):
    exit_code = 2  # bad config or data, unless a subclass says otherwise


class TrainingDivergedError(AlignkitError):
    """Training went wrong in a way the user can fix: a loss that is NaN or infinite, or a run that
    trained zero optimiser steps. The stage's manifest then says ``failed``."""


class RunLockedError(AlignkitError):
    """Another process holds the stage directory's lock: one run per stage directory at a time."""

    exit_code = 1


class UnfinishedInputError(AlignkitError):
    """An input comes from a stage run that did not complete (failed, interrupted or still running):
    what it left behind may be stale or half written, so no stage reads it."""
