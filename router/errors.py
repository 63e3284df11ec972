"""Errors a person can act on: which field, which value, what to do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

__all__ = ["ConfigError", "Problem", "did_you_mean"]


class Problem(BaseModel):
    """One actionable complaint about an input (manifest field, config key, bundle file)."""

    field: str
    value: Any = None
    message: str

    @classmethod
    def cannot_read(cls, field: str, value: Any, exc: OSError) -> Problem:
        """A file the router's user could not open, stat or read, and the fix."""
        return cls(field=field, value=value, message=f"cannot read: {exc.strerror or exc}; "
                   "make it readable by the router's user")

    def render(self) -> str:
        shown = "" if self.value is None else f" = {self.value!r}"
        return f"{self.field}{shown}: {self.message}"


class ConfigError(Exception):
    """A configuration that cannot be used; names the file, the key path and the fix."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p.render()}" for p in problems)
        super().__init__(f"invalid configuration in {source}:\n{lines}")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
