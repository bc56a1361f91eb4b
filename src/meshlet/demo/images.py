"""The image map: from a container's ``image`` to the command that runs it without a container
engine. The format is described at the top of ``images.yaml``, the map Bookinfo ships.

``ImageMap.parse`` checks a map once; ``command_for`` then answers by trying the patterns in
the order written (first match wins) and puts the given interpreter in place of ``python``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import yaml

from meshlet.demo import image_map

#: The first word of a command that stands for the interpreter meshlet runs on.
PYTHON = "python"


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageMap:
    entries: tuple[tuple[str, tuple[str, ...]], ...]  # (pattern, command), in file order

    @classmethod
    def parse(cls, text: str, source: str = "<image map>") -> ImageMap:
        """Raises ValueError naming ``source`` and the entry when the map is malformed."""
        data = yaml.safe_load(text)
        if data is None:
            return cls(entries=())
        if not isinstance(data, dict):
            raise ValueError(f"{source}: an image map is a mapping of image pattern to command")
        entries = []
        for pattern, command in data.items():
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"{source}: pattern {pattern!r} is not a non-empty string")
            if (
                not isinstance(command, list)
                or not command
                or not all(isinstance(word, str) and word for word in command)
            ):
                raise ValueError(
                    f"{source}: {pattern}: the command must be a non-empty list of strings"
                )
            entries.append((pattern, tuple(command)))
        return cls(entries=tuple(entries))

    @classmethod
    def bookinfo(cls) -> ImageMap:
        """The map shipped with the demo."""
        return cls.parse(image_map().read_text(encoding="utf-8"), "meshlet/demo/images.yaml")

    def command_for(self, image: str, python: str) -> list[str] | None:
        """The command for ``image`` with ``python`` as the interpreter, or None if no pattern
        matches."""
        for pattern, command in self.entries:
            if fnmatchcase(image, pattern):
                return _with_interpreter(command, python)
        return None

    def __repr__(self) -> str:
        return f"<ImageMap {len(self.entries)} patterns>"


def _with_interpreter(command: Sequence[str], python: str) -> list[str]:
    if command[0] == PYTHON:
        return [python, *command[1:]]
    return list(command)
