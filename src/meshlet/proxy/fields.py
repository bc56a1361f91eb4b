"""Refusing what the proxy does not implement, by field path.

DESIGN: unsupported fields are refused with a message naming the field -- never silently
ignored. Each compiler lists the fields it honours for a message type; ``check_fields`` raises
for anything else that is set.
"""

from __future__ import annotations

from collections.abc import Collection

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from meshlet.errors import ConfigError, Problem


def check_fields(msg: Message, path: str, supported: Collection[str]) -> None:
    """Raise ``ConfigError`` naming every set field of ``msg`` that is not in ``supported``."""
    problems = [
        Problem(path=join(path, fd.name), message="is not supported by meshlet")
        for fd, _ in msg.ListFields()
        if fd.name not in supported
    ]
    if problems:
        raise ConfigError(problems)


def join(path: str, field: str) -> str:
    return f"{path}.{field}" if path else field


def seconds(d: Duration, default: float | None = None, *, present: bool = True) -> float | None:
    """A Duration as float seconds; ``default`` when the field is not set (``present`` False)."""
    if not present:
        return default
    return d.seconds + d.nanos / 1e9


def duration_field(msg: Message, name: str, default: float | None) -> float | None:
    """The Duration field ``name`` of ``msg`` in seconds, or ``default`` when unset."""
    if not msg.HasField(name):
        return default
    d = getattr(msg, name)
    return float(d.seconds + d.nanos / 1e9)


def uint_field(msg: Message, name: str, default: int) -> int:
    """A google.protobuf.UInt32Value/UInt64Value field, or ``default`` when unset."""
    if not msg.HasField(name):
        return default
    return int(getattr(msg, name).value)
