"""Reading an Envoy v3 bootstrap file (YAML or JSON) into xds-protos messages.

Parsing only: this module turns a file into a ``Bootstrap`` proto and names the file, line and
field of anything malformed. What the proxy makes of the proto is ``config``'s business, so the
ADS client can feed the same compiler.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2

# Registering the typed_config messages meshlet understands: json_format resolves an Any's
# "@type" through the default descriptor pool, which only knows imported modules.
from envoy.config.trace.v3 import opentelemetry_pb2 as _otel_pb2  # noqa: F401
from envoy.extensions.access_loggers.file.v3 import file_pb2 as _file_pb2  # noqa: F401
from envoy.extensions.access_loggers.stream.v3 import stream_pb2 as _stream_pb2  # noqa: F401
from envoy.extensions.filters.http.fault.v3 import fault_pb2 as _fault_pb2  # noqa: F401
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as _jwt_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2 as _router_pb2  # noqa: F401
from envoy.extensions.filters.listener.tls_inspector.v3 import (  # noqa: F401
    tls_inspector_pb2 as _tls_inspector_pb2,
)
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2 as _hcm_pb2,
)
from envoy.extensions.retry.host.previous_hosts.v3 import (  # noqa: F401
    previous_hosts_pb2 as _previous_hosts_pb2,
)
from envoy.extensions.transport_sockets.raw_buffer.v3 import (  # noqa: F401
    raw_buffer_pb2 as _raw_buffer_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2 as _tls_pb2  # noqa: F401
from google.protobuf import json_format

from meshlet.errors import ConfigError, Problem

_PARSE_PREFIX = re.compile(r"^(Failed to parse \w+ field: )+")
_AT_PATH = re.compile(r'\s+at "?Bootstrap\.?([^"\s]*?)"?\.*$', re.S)
_NO_FIELD = re.compile(r'has no field named "([^"]+)"')
_UNKNOWN_TYPE = re.compile(r"Can not find message descriptor by type_url: (\S+)")


@dataclass(frozen=True, slots=True)
class LoadedBootstrap:
    """A parsed bootstrap and where it came from, to point later errors at their lines."""

    message: bootstrap_pb2.Bootstrap
    source: str
    root: yaml.Node | None

    def locate(self, error: ConfigError) -> ConfigError:
        """``error`` with this file's name and, where the field is found, its line."""
        problems = [
            Problem(path=p.path, message=p.message, line=p.line or line_of(self.root, p.path))
            for p in error.problems
        ]
        return ConfigError(problems, source=self.source)


def load_bootstrap(path: str | Path) -> LoadedBootstrap:
    """Read ``path`` into a Bootstrap message.

    Raises ``ConfigError`` naming the file (and line where known) for unreadable files, YAML
    or JSON syntax errors, unknown fields, bad enum values and unknown ``@type`` URLs.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([Problem(path="", message=f"cannot read: {e.strerror}")], source) from e
    return parse_bootstrap(text, source)


def parse_bootstrap(text: str, source: str) -> LoadedBootstrap:
    """Parse bootstrap ``text`` (YAML, of which JSON is a subset) from ``source``."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(
            [Problem(path="", message=f"invalid YAML: {e.problem}", line=line)], source
        ) from e
    except yaml.YAMLError as e:
        raise ConfigError([Problem(path="", message=f"invalid YAML: {e}")], source) from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [Problem(path="", message="must be a mapping (an Envoy bootstrap)")], source
        )
    message = bootstrap_pb2.Bootstrap()
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as e:
        problem = _problem_from_parse_error(str(e))
        raise ConfigError([_with_line(problem, root)], source) from e
    return LoadedBootstrap(message, source, root)


def _problem_from_parse_error(text: str) -> Problem:
    """Turn protobuf's nested ``ParseError`` text into one field path and a short message."""
    text = _PARSE_PREFIX.sub("", text.strip())
    text = text.split("\n Available Fields", 1)[0]
    path = ""
    if m := _AT_PATH.search(text):
        path = m.group(1).rstrip(".")
        text = text[: m.start()]
    if m := _NO_FIELD.search(text):
        return Problem(path=_join(path, m.group(1)), message="unknown field")
    if m := _UNKNOWN_TYPE.search(text):
        return Problem(
            path=_join(path, "@type"), message=f"{m.group(1)} is not supported by meshlet"
        )
    return Problem(path=path, message=text.rstrip(". "))


def _join(path: str, field: str) -> str:
    return f"{path}.{field}" if path else field


def line_of(root: yaml.Node | None, path: str) -> int | None:
    """The 1-based line of the YAML node at a proto field path like ``a.b[2].c``.

    Keys may be written in snake_case or in JSON's lowerCamelCase; both are looked for.
    Returns the deepest line found, so a path into an unknown sub-field still points near it.
    """
    node = root
    line = None
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if node is None:
            break
        if part.startswith("["):
            index = int(part[1:-1])
            node = (
                node.value[index]
                if isinstance(node, yaml.SequenceNode) and index < len(node.value)
                else None
            )
        elif isinstance(node, yaml.MappingNode):
            names = {part, _camel(part)}
            found: Any = None
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value in names:
                    found = value
                    line = key.start_mark.line + 1
                    break
            node = found
            continue
        else:
            node = None
        if node is not None:
            line = node.start_mark.line + 1
    return line


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _with_line(problem: Problem, root: yaml.Node | None) -> Problem:
    return Problem(path=problem.path, message=problem.message, line=line_of(root, problem.path))
