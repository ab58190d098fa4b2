"""Errors that reach a user as one line: what file or option, and what is wrong."""

from __future__ import annotations

from pathlib import Path


class SatkitError(Exception):
    """Base class of every error satkit reports to a user (the CLI prints it on one line)."""


class StoreError(SatkitError):
    """A store is missing, not a satkit store, too new, or inconsistent."""


class SourceError(SatkitError):
    """A dataset on disk is malformed: names the file and the problem."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class VerifyError(SatkitError):
    """A store does not match its digests or a manifest."""
