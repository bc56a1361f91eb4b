"""The exception family that users can cause, translated into messages once, at the CLI edge.

Rules: every error a user can fix carries where (file, line or field path) and what to do
next; nothing below the CLI prints or exits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


class MeshletError(Exception):
    """Base of every error meant for a person rather than a traceback."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """One thing wrong with a configuration: the field path and what is wrong with it."""

    path: str
    message: str
    line: int | None = None

    def render(self, source: str | None) -> str:
        """``file:line: field.path: message`` (parts that are unknown are left out)."""
        where = source or ""
        if self.line:
            where = f"{where}:{self.line}" if where else f"line {self.line}"
        parts = [p for p in (where, self.path) if p]
        return ": ".join([*parts, self.message])


class ConfigError(MeshletError):
    """A configuration that cannot be applied. Nothing of it was applied.

    ``problems`` lists every problem found; ``str()`` gives one line per problem, each naming
    the source file (when known) and the field.
    """

    def __init__(self, problems: Iterable[Problem], source: str | None = None) -> None:
        self.problems = tuple(problems)
        self.source = source
        super().__init__(self.render())

    @classmethod
    def at(cls, path: str, message: str) -> ConfigError:
        return cls([Problem(path=path, message=message)])

    def with_source(self, source: str) -> ConfigError:
        return ConfigError(self.problems, source=source)

    def render(self) -> str:
        return "\n".join(p.render(self.source) for p in self.problems)


class ProblemList:
    """Collects problems across independent parts so that one run reports all of them."""

    def __init__(self) -> None:
        self.items: list[Problem] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(Problem(path=path, message=message))

    def extend(self, error: ConfigError) -> None:
        self.items.extend(error.problems)

    def raise_if_any(self, source: str | None = None) -> None:
        if self.items:
            raise ConfigError(self.items, source=source)
