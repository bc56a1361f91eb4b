"""Refusing what the proxy does not implement, by field path.

DESIGN: unsupported fields are refused with a message naming the field -- never silently
ignored. Each compiler lists the fields it honours for a message type; ``check_fields`` raises
for anything else that is set.
"""

from __future__ import annotations

from collections.abc import Collection

from envoy.config.core.v3 import config_source_pb2
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


#: Envoy's default ``initial_fetch_timeout`` for a resource the first configuration waits for.
DEFAULT_FETCH_TIMEOUT = 15.0


def ads_config_source(msg: config_source_pb2.ConfigSource, path: str) -> float | None:
    """Check a ``ConfigSource`` that must be ``{ads: {}}``; return its initial fetch timeout
    in seconds (``None``: wait without limit, as ``initial_fetch_timeout: 0s`` says)."""
    check_fields(msg, path, {"ads", "resource_api_version", "initial_fetch_timeout"})
    if not msg.HasField("ads"):
        raise ConfigError.at(path, "must be {ads: {}} (only ADS is supported)")
    check_fields(msg.ads, join(path, "ads"), ())
    if msg.resource_api_version not in (config_source_pb2.AUTO, config_source_pb2.V3):
        raise ConfigError.at(join(path, "resource_api_version"), "only V3 is supported")
    timeout = duration_field(msg, "initial_fetch_timeout", DEFAULT_FETCH_TIMEOUT)
    return timeout or None
