"""Access logs compiled from Envoy's ``AccessLog`` protos, written through buffered sinks.

A format string is compiled once, when configuration arrives, into a ``%``-template and a
tuple of providers (one small function per command operator); logging a request calls the
providers and fills the template. JSON formats compile into a tree of the same providers.

Rules kept from Envoy (``source/common/formatter``, docs ``observability/access_log``):

* ``%COMMAND(arg):LEN%``; ``%%`` is a literal ``%``; an unknown operator is refused.
* A value that is not there renders ``-`` in text (empty with ``omit_empty_values``); in JSON a
  value made of one operator keeps its type (numbers stay numbers, missing is ``null``, or the
  key is left out with ``omit_empty_values``); a value mixing text and operators is a string.
* ``REQ(X?Y)`` is header X, else header Y; names are case-insensitive; a repeated header gives
  its first value. ``:PATH``, ``:AUTHORITY``, ``:METHOD``, ``:SCHEME`` come from the head.
* No ``log_format``: Envoy's default format, newline-terminated. Text formats are written as
  given (add ``\\n`` yourself); JSON lines end with ``\\n``.

Sinks buffer whole lines in memory and write them on ``flush()`` (the server calls it every
second, as Envoy's file flush timer does, and at shutdown) or when 64 KiB are waiting. Writers
of one path share one sink and one append-mode file descriptor.
"""

from __future__ import annotations

import json
import operator
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import substitution_format_string_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2

from meshlet.errors import ConfigError, ProblemList
from meshlet.proxy.fields import check_fields, join
from meshlet.proxy.headers import RequestHead
from meshlet.proxy.matching import compile_header_matcher
from meshlet.proxy.stream_info import StreamInfo

#: Envoy's default format (``SubstitutionFormatUtils::DEFAULT_FORMAT``).
DEFAULT_FORMAT: Final = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
    "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "
    '"%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" '
    '"%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n'
)

FLUSH_BYTES: Final = 64 * 1024

_TYPE_PREFIX: Final = "type.googleapis.com/"
_FILE_LOG: Final = file_pb2.FileAccessLog.DESCRIPTOR.full_name
_STDOUT_LOG: Final = stream_pb2.StdoutAccessLog.DESCRIPTOR.full_name
_STDERR_LOG: Final = stream_pb2.StderrAccessLog.DESCRIPTOR.full_name

Value = str | int | None
Provider = Callable[[StreamInfo], Value]
LogFilter = Callable[[StreamInfo], bool]


# -- command operators -------------------------------------------------------------------------
# Each factory takes the operator's argument (None when absent) and max length, and returns a
# provider: a function of the StreamInfo giving a str, an int, or None when the value is absent.

_COMMAND: Final = re.compile(r"%([A-Z0-9_]+)(?:\(([^)]*)\))?(?::([0-9]+))?%")


def _decode(value: bytes) -> str:
    # surrogateescape: text logs get the header's bytes back unchanged when encoded again.
    return value.decode("utf-8", "surrogateescape")


def _truncated(provider: Callable[[StreamInfo], str | None], max_len: int | None) -> Provider:
    if max_len is None:
        return provider

    def truncate(info: StreamInfo) -> Value:
        value = provider(info)
        return value if value is None else value[:max_len]

    return truncate


_PSEUDO_OR_HOST: Final = frozenset((b":authority", b":path", b":method", b":scheme", b"host"))


_REQUEST_LINE_FIELDS: Final = {
    b":authority": "authority",
    b"host": "authority",
    b":path": "path",
    b":method": "method",
    b":scheme": "scheme",
}


def _request_getter(name: bytes) -> Callable[[RequestHead], bytes | None]:
    field = _REQUEST_LINE_FIELDS.get(name)
    if field is not None:
        return operator.attrgetter(field)  # C: no Python frame per call

    def first_value(head: RequestHead) -> bytes | None:  # the first value, as Envoy's formatter
        for k, v in head.headers.items:
            if k == name:
                return v
        return None

    return first_value


_HEADER_NAME: Final = re.compile(r":?[!#$&'*+\-.^_`|~0-9A-Za-z]+")


def _header_names(arg: str, where: str, command: str) -> tuple[bytes, bytes | None]:
    parts = arg.split("?")
    if len(parts) > 2 or not all(_HEADER_NAME.fullmatch(p) for p in parts):
        raise ConfigError.at(where, f"%{command}({arg})% must name a header, or two as X?Y")
    names = [p.lower().encode("ascii") for p in parts]
    return names[0], names[1] if len(names) > 1 else None


def _request_header(strip_query: bool) -> Callable[[str, int | None, str, str], Provider]:
    def factory(arg: str, max_len: int | None, where: str, command: str) -> Provider:
        main, alt = _header_names(arg, where, command)
        get_main = _request_getter(main)
        get_alt = _request_getter(alt) if alt is not None else None

        def request_header(info: StreamInfo) -> str | None:
            head = info.request
            if head is None:
                return None
            value = get_main(head)
            if value is None and get_alt is not None:
                value = get_alt(head)
            if value is None:
                return None
            if strip_query:
                value = value.split(b"?", 1)[0]
            return value.decode("utf-8", "surrogateescape")  # as _decode, one call fewer

        return _truncated(request_header, max_len)

    return factory


def _response_header(arg: str, max_len: int | None, where: str, command: str) -> Provider:
    main, alt = _header_names(arg, where, command)

    def get(info: StreamInfo, name: bytes) -> bytes | None:
        if name == b":status":
            return b"%d" % info.response_code if info.response_code else None
        headers = info.response_headers
        return None if headers is None else headers.get(name)

    def response_header(info: StreamInfo) -> str | None:
        value = get(info, main)
        if value is None and alt is not None:
            value = get(info, alt)
        return None if value is None else _decode(value)

    return _truncated(response_header, max_len)


_DEFAULT_START_TIME: Final[tuple[str | int, ...]] = ("%Y-%m-%dT%H:%M:%S.", 3, "Z")


class _StartTime:
    """``%START_TIME%`` (ISO-8601 UTC with ms) or ``%START_TIME(fmt)%``.

    ``fmt`` is strftime (UTC) plus Envoy's extras: ``%s`` epoch seconds, ``%f`` / ``%<n>f``
    fractional seconds (9 or n digits), ``%E<n>S`` seconds with n fractional digits. The parts
    that change only once a second are cached, as Envoy caches them.
    """

    __slots__ = ("_pieces", "_rendered", "_second")

    _TOKEN: Final = re.compile(r"%%|%s|%([1-9])?f|%E([1-9])S")
    _EPOCH: Final = 0  # piece: epoch seconds; n > 0: n fraction digits; -n: %E<n>S

    def __init__(self, fmt: str | None) -> None:
        # str pieces are strftime text, rendered once per second.
        pieces: list[str | int] = []
        if not fmt:
            self._pieces: tuple[str | int, ...] = _DEFAULT_START_TIME
        else:
            pos = 0
            for m in self._TOKEN.finditer(fmt):
                if m.group(0) == "%%":
                    continue  # strftime renders it
                pieces.append(fmt[pos : m.start()])
                pos = m.end()
                if m.group(0) == "%s":
                    pieces.append(self._EPOCH)
                elif m.group(2):
                    pieces.append(-int(m.group(2)))
                else:
                    pieces.append(int(m.group(1) or 9))
            pieces.append(fmt[pos:])
            self._pieces = tuple(p for p in pieces if p != "")
        self._second = -1
        self._rendered: tuple[str, ...] = ()

    def __call__(self, info: StreamInfo) -> str:
        micros = round(info.start_wall * 1_000_000)
        second, frac = divmod(micros, 1_000_000)
        if second == self._second and self._pieces is _DEFAULT_START_TIME:  # the common case
            return f"{self._rendered[0]}{frac // 1000:03d}Z"
        if second != self._second:
            tm = time.gmtime(second)
            self._rendered = tuple(
                time.strftime(p, tm) if isinstance(p, str) else str(second) if p == 0 else ""
                for p in self._pieces
            )
            self._second = second
        nanos = f"{frac * 1000:09d}"
        out = []
        for piece, rendered in zip(self._pieces, self._rendered, strict=True):
            if isinstance(piece, str) or piece == 0:
                out.append(rendered)
            elif piece > 0:
                out.append(nanos[:piece])
            else:
                out.append(f"{second % 60:02d}.{nanos[:-piece]}")
        return "".join(out)


def _without_port(address: str) -> str:
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _port(address: str) -> int | None:
    _, sep, port = address.rpartition(":")
    return int(port) if sep and port.isdigit() else None


def _or_none(value: str) -> str | None:
    return value or None


def _duration(info: StreamInfo) -> int | None:
    return None if info.end is None else int((info.end - info.start) * 1000)


def _protocol(info: StreamInfo) -> str | None:
    head = info.request
    return None if head is None else "HTTP/" + head.version.decode("latin-1")


def _absent(info: StreamInfo) -> None:
    return None


# Operators without an argument: name -> provider. Some facts meshlet does not track yet
# (upstream local address and TLS, termination details) are absent, which renders "-" as Envoy
# renders them when they are unset.
_SIMPLE: Final[dict[str, Provider]] = {
    "PROTOCOL": _protocol,
    "RESPONSE_CODE": operator.attrgetter("response_code"),
    "RESPONSE_CODE_DETAILS": lambda info: info.response_code_details or None,
    "RESPONSE_FLAGS": operator.attrgetter("flags_str"),
    "BYTES_RECEIVED": operator.attrgetter("bytes_received"),
    "BYTES_SENT": operator.attrgetter("bytes_sent"),
    "DURATION": _duration,
    "UPSTREAM_HOST": lambda info: info.upstream_host or None,
    "UPSTREAM_REMOTE_ADDRESS": lambda info: info.upstream_host or None,
    "UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": lambda info: (
        _without_port(info.upstream_host) if info.upstream_host else None
    ),
    "UPSTREAM_CLUSTER": lambda info: info.upstream_cluster or None,
    "UPSTREAM_CLUSTER_RAW": lambda info: info.upstream_cluster or None,
    "UPSTREAM_LOCAL_ADDRESS": _absent,
    "UPSTREAM_TRANSPORT_FAILURE_REASON": _absent,
    "CONNECTION_TERMINATION_DETAILS": _absent,
    "REQUESTED_SERVER_NAME": lambda info: (
        info.downstream_tls.sni or None if info.downstream_tls else None
    ),
    "DOWNSTREAM_PEER_URI_SAN": lambda info: (
        ",".join(info.downstream_tls.peer_uri_sans) or None if info.downstream_tls else None
    ),
    "DOWNSTREAM_LOCAL_URI_SAN": lambda info: (
        ",".join(info.downstream_tls.local_uri_sans) or None if info.downstream_tls else None
    ),
    "DOWNSTREAM_PEER_DNS_SAN": lambda info: (
        ",".join(info.downstream_tls.peer_dns_sans) or None if info.downstream_tls else None
    ),
    "DOWNSTREAM_PEER_SUBJECT": lambda info: (
        info.downstream_tls.peer_subject or None if info.downstream_tls else None
    ),
    "DOWNSTREAM_PEER_FINGERPRINT_256": lambda info: (
        info.downstream_tls.peer_cert_sha256 or None if info.downstream_tls else None
    ),
    "DOWNSTREAM_TLS_VERSION": lambda info: (
        info.downstream_tls.version or None if info.downstream_tls else None
    ),
    "ROUTE_NAME": lambda info: info.route_name or None,
    "DOWNSTREAM_REMOTE_ADDRESS": lambda info: info.downstream_remote or None,
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": lambda info: (
        _without_port(info.downstream_remote) or None
    ),
    "DOWNSTREAM_REMOTE_PORT": lambda info: _port(info.downstream_remote),
    # No PROXY protocol or trusted XFF yet: the direct peer is the remote address.
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS": lambda info: info.downstream_remote or None,
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT": lambda info: (
        _without_port(info.downstream_remote) or None
    ),
    "DOWNSTREAM_LOCAL_ADDRESS": lambda info: info.downstream_local or None,
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": lambda info: (
        _without_port(info.downstream_local) or None
    ),
    "DOWNSTREAM_LOCAL_PORT": lambda info: _port(info.downstream_local),
}

_HEADER_OPERATORS: Final[dict[str, Callable[[str, int | None, str, str], Provider]]] = {
    "REQ": _request_header(strip_query=False),
    "REQUEST_HEADER": _request_header(strip_query=False),
    "REQ_WITHOUT_QUERY": _request_header(strip_query=True),
    "RESP": _response_header,
    "RESPONSE_HEADER": _response_header,
}


def _operator(command: str, arg: str | None, max_len: int | None, where: str) -> Provider:
    """The provider for one ``%COMMAND(arg):max_len%``; ConfigError naming ``where``."""
    if command in _HEADER_OPERATORS:
        if not arg:
            raise ConfigError.at(where, f"%{command}% needs a header name: %{command}(X)%")
        return _HEADER_OPERATORS[command](arg, max_len, where, command)
    if max_len is not None:
        raise ConfigError.at(where, f"%{command}% does not take a length (:{max_len})")
    if command == "START_TIME":
        return _StartTime(arg)
    if command == "HOSTNAME":
        hostname = socket.gethostname()
        provider: Provider = lambda info: hostname  # noqa: E731
    elif command in _SIMPLE:
        provider = _SIMPLE[command]
    else:
        raise ConfigError.at(where, f"command operator %{command}% is not supported by meshlet")
    if arg is not None:
        raise ConfigError.at(where, f"%{command}% does not take an argument ({arg})")
    return provider


def _parse(fmt: str, where: str) -> list[str | Provider]:
    """Split a format string into literal text and providers (Envoy's parser rules)."""
    out: list[str | Provider] = []
    text: list[str] = []
    pos = 0
    while True:
        pct = fmt.find("%", pos)
        if pct < 0:
            text.append(fmt[pos:])
            break
        text.append(fmt[pos:pct])
        if fmt.startswith("%%", pct):
            text.append("%")
            pos = pct + 2
            continue
        m = _COMMAND.match(fmt, pct)
        if m is None:
            raise ConfigError.at(where, f"no valid command operator at position {pct}: {fmt!r}")
        if text:
            out.append("".join(text))
            text = []
        command, arg, length = m.groups()
        out.append(_operator(command, arg, int(length) if length else None, where))
        pos = m.end()
    literal = "".join(text)
    if literal:
        out.append(literal)
    return [part for part in out if part != ""]


# -- formatters --------------------------------------------------------------------------------


class Formatter(Protocol):
    """Turns one request into one log entry, as bytes ready for the sink."""

    def format(self, info: StreamInfo) -> bytes: ...


class TextFormatter:
    """A compiled format string: ``template % values``, one value per operator."""

    __slots__ = ("_empty", "_providers", "_template")

    def __init__(self, fmt: str, where: str, *, omit_empty_values: bool = False) -> None:
        template: list[str] = []
        providers: list[Provider] = []
        for part in _parse(fmt, where):
            if isinstance(part, str):
                template.append(part.replace("%", "%%"))
            else:
                template.append("%s")
                providers.append(part)
        self._template = "".join(template)
        self._providers = tuple(providers)
        self._empty = "" if omit_empty_values else "-"

    def __repr__(self) -> str:
        return f"<TextFormatter {self._template!r}>"

    def format(self, info: StreamInfo) -> bytes:
        return self.format_str(info).encode("utf-8", "surrogateescape")

    def format_str(self, info: StreamInfo) -> str:
        empty = self._empty
        values = []
        for provider in self._providers:
            value = provider(info)
            values.append(empty if value is None else value)
        return self._template % tuple(values)


# A compiled JSON node: a constant, a typed single provider, a mixed string, a dict or a list.
_Node = tuple[str, Any]


class JsonFormatter:
    """A compiled ``json_format`` Struct: one JSON object per line, compact, keys sorted,
    ``\\n``-ended."""

    __slots__ = ("_omit_empty", "_root")

    def __init__(self, struct: Any, where: str, *, omit_empty_values: bool = False) -> None:
        self._omit_empty = omit_empty_values
        self._root = self._compile_struct(struct, where)

    def __repr__(self) -> str:
        return f"<JsonFormatter {len(self._root[1])} keys>"

    def _compile_struct(self, struct: Any, where: str) -> _Node:
        # Keys are always sorted: a Struct is a proto map, whose order is arbitrary, and Envoy
        # keeps the format in a std::map (sort_properties is therefore implied).
        fields = struct.fields
        return (
            "dict",
            tuple((k, self._compile_value(fields[k], f"{where}.{k}")) for k in sorted(fields)),
        )

    def _compile_value(self, value: Any, where: str) -> _Node:
        kind = value.WhichOneof("kind")
        if kind == "string_value":
            parts = _parse(value.string_value, where)
            if len(parts) == 1 and not isinstance(parts[0], str):
                return ("typed", parts[0])
            if all(isinstance(p, str) for p in parts):
                return ("const", "".join(p for p in parts if isinstance(p, str)))
            return (
                "text",
                TextFormatter(value.string_value, where, omit_empty_values=self._omit_empty),
            )
        if kind == "number_value":
            number = value.number_value
            return ("const", int(number) if number.is_integer() else number)
        if kind == "struct_value":
            return self._compile_struct(value.struct_value, where)
        if kind == "list_value":
            items = value.list_value.values
            return (
                "list",
                tuple(self._compile_value(v, f"{where}[{i}]") for i, v in enumerate(items)),
            )
        raise ConfigError.at(
            where, f"{kind} is not supported: use strings, numbers, nested structs or lists"
        )

    def _render(self, node: _Node, info: StreamInfo) -> Any:
        kind, body = node
        if kind == "typed":
            return body(info)
        if kind == "text":
            return body.format_str(info)
        if kind == "const":
            return body
        omit = self._omit_empty
        if kind == "dict":
            out = {}
            for key, child in body:
                value = self._render(child, info)
                if value is not None or not omit:
                    out[key] = value
            return out
        values = [self._render(child, info) for child in body]
        return [v for v in values if v is not None] if omit else values

    def format(self, info: StreamInfo) -> bytes:
        line = json.dumps(self._render(self._root, info), ensure_ascii=False, separators=(",", ":"))
        # Undecodable header bytes (surrogates) become "?" to keep the line valid UTF-8.
        return (line + "\n").encode("utf-8", "replace")


def compile_log_format(
    proto: substitution_format_string_pb2.SubstitutionFormatString | None, where: str
) -> Formatter:
    """A ``SubstitutionFormatString`` (or None: Envoy's default format) as a ``Formatter``."""
    if proto is None:
        return TextFormatter(DEFAULT_FORMAT, where)
    check_fields(
        proto,
        where,
        ("text_format", "text_format_source", "json_format", "omit_empty_values",
         "json_format_options"),
    )  # fmt: skip
    omit = proto.omit_empty_values
    which = proto.WhichOneof("format")
    if which == "json_format":
        return JsonFormatter(proto.json_format, join(where, "json_format"), omit_empty_values=omit)
    if proto.HasField("json_format_options"):
        raise ConfigError.at(join(where, "json_format_options"), "applies only to json_format")
    if which == "text_format":  # deprecated, same meaning as text_format_source.inline_string
        return TextFormatter(proto.text_format, join(where, "text_format"), omit_empty_values=omit)
    if which == "text_format_source":
        source_path = join(where, "text_format_source")
        source = proto.text_format_source
        check_fields(source, source_path, ("inline_string", "inline_bytes"))
        if source.WhichOneof("specifier") == "inline_bytes":
            fmt = source.inline_bytes.decode("utf-8", "surrogateescape")
            return TextFormatter(fmt, join(source_path, "inline_bytes"), omit_empty_values=omit)
        return TextFormatter(
            source.inline_string, join(source_path, "inline_string"), omit_empty_values=omit
        )
    raise ConfigError.at(where, "needs text_format_source or json_format")


# -- filters -----------------------------------------------------------------------------------

_COMPARE: Final[dict[int, Callable[[int, int], bool]]] = {
    accesslog_pb2.ComparisonFilter.EQ: operator.eq,
    accesslog_pb2.ComparisonFilter.GE: operator.ge,
    accesslog_pb2.ComparisonFilter.LE: operator.le,
    accesslog_pb2.ComparisonFilter.NE: operator.ne,
}

# Envoy's response flag short names (``response_flag_filter`` validates against them).
_RESPONSE_FLAGS: Final = frozenset((
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
    "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR",
))  # fmt: skip


def _comparison(proto: accesslog_pb2.ComparisonFilter, where: str) -> Callable[[int], bool]:
    check_fields(proto, where, ("op", "value"))
    # runtime_key names a runtime override; meshlet has no runtime, so the default applies,
    # as in Envoy when the key is unset.
    check_fields(proto.value, join(where, "value"), ("default_value", "runtime_key"))
    compare = _COMPARE[proto.op]
    bound = proto.value.default_value
    return lambda value: compare(value, bound)


def compile_filter(proto: accesslog_pb2.AccessLogFilter, where: str) -> LogFilter:
    """An ``AccessLogFilter`` as a predicate; unsupported filter kinds are refused by name."""
    which = proto.WhichOneof("filter_specifier")
    sub = join(where, which or "")
    if which == "status_code_filter":
        check_fields(proto.status_code_filter, sub, ("comparison",))
        accept = _comparison(proto.status_code_filter.comparison, join(sub, "comparison"))
        return lambda info: accept(info.response_code)
    if which == "duration_filter":
        check_fields(proto.duration_filter, sub, ("comparison",))
        accept = _comparison(proto.duration_filter.comparison, join(sub, "comparison"))

        def duration_filter(info: StreamInfo) -> bool:
            ms = _duration(info)
            return ms is not None and accept(ms)

        return duration_filter
    if which == "response_flag_filter":
        wanted = tuple(proto.response_flag_filter.flags)
        for i, flag in enumerate(wanted):
            if flag not in _RESPONSE_FLAGS:
                raise ConfigError.at(f"{sub}.flags[{i}]", f"unknown response flag {flag!r}")
        if not wanted:
            return lambda info: bool(info.flags)
        wanted_set = frozenset(wanted)
        return lambda info: any(f in wanted_set for f in info.flags)
    if which == "header_filter":
        # Envoy: the request's headers against one HeaderMatcher; a stream that never had a
        # request head (a malformed request) does not match.
        check_fields(proto.header_filter, sub, ("header",))
        matcher = compile_header_matcher(proto.header_filter.header, join(sub, "header"))

        def header_filter(info: StreamInfo) -> bool:
            head = info.request
            return head is not None and matcher.matches(head)

        return header_filter
    if which in ("and_filter", "or_filter"):
        group = getattr(proto, which)
        if len(group.filters) < 2:
            raise ConfigError.at(join(sub, "filters"), "needs at least two filters")
        subs = tuple(compile_filter(f, f"{sub}.filters[{i}]") for i, f in enumerate(group.filters))
        if which == "and_filter":
            return lambda info: all(f(info) for f in subs)
        return lambda info: any(f(info) for f in subs)
    if which is None:
        raise ConfigError.at(where, "is empty: set one filter")
    raise ConfigError.at(sub, "is not supported by meshlet")


# -- sinks -------------------------------------------------------------------------------------


class LogSink:
    """Log lines waiting to be written to one file or process stream.

    Write errors (disk full, closed pipe) never reach the request path: the buffer is dropped
    and ``write_failed`` counts it, like Envoy's ``filesystem.write_failed``.
    """

    __slots__ = ("_chunks", "_fd", "_size", "path", "write_failed")

    def __init__(self, path: str, fd: int | None) -> None:
        self.path = path
        self._fd = fd  # None: the process stream named by path (/dev/stdout, /dev/stderr)
        self._chunks: list[bytes] = []
        self._size = 0
        self.write_failed = 0

    def __repr__(self) -> str:
        return f"<LogSink {self.path} [{self._size} bytes buffered]>"

    @property
    def buffered(self) -> int:
        return self._size

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._chunks:
            return
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        try:
            if self._fd is None:
                self._write_stream(data)
            else:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
        except (OSError, ValueError):  # ValueError: the stream was closed
            self.write_failed += 1

    def _write_stream(self, data: bytes) -> None:
        # Looked up at each flush: tests and embedders may replace sys.stdout.
        stream = sys.stderr if self.path == "/dev/stderr" else sys.stdout
        stream.flush()
        buffer = getattr(stream, "buffer", None)
        if buffer is not None:
            buffer.write(data)
            buffer.flush()
        else:
            stream.write(data.decode("utf-8", "replace"))
            stream.flush()

    def reopen(self) -> None:
        """Flush, then reopen the file at its path (log rotation; Envoy does it on SIGUSR1)."""
        self.flush()
        if self._fd is not None:
            fd = _open_append(self.path)
            os.close(self._fd)
            self._fd = fd

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_STREAM_PATHS: Final = ("/dev/stdout", "/dev/stderr")


def _open_append(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


class AccessLogManager:
    """The sinks of one process, one per path (Envoy's AccessLogManager)."""

    __slots__ = ("_sinks",)

    def __init__(self) -> None:
        self._sinks: dict[str, LogSink] = {}

    def __repr__(self) -> str:
        return f"<AccessLogManager {sorted(self._sinks)}>"

    def sink(self, path: str, where: str) -> LogSink:
        """The sink for ``path``, opening the file (append, created if missing) on first use."""
        sink = self._sinks.get(path)
        if sink is None:
            fd = None
            if path not in _STREAM_PATHS:
                try:
                    fd = _open_append(path)
                except OSError as e:
                    raise ConfigError.at(
                        where, f"cannot open {path!r} for appending: {e.strerror}"
                    ) from e
            sink = self._sinks[path] = LogSink(path, fd)
        return sink

    def flush(self) -> None:
        for sink in self._sinks.values():
            sink.flush()

    def reopen(self) -> None:
        for sink in self._sinks.values():
            try:
                sink.reopen()
            except OSError:
                sink.write_failed += 1

    def close(self) -> None:
        for sink in self._sinks.values():
            sink.close()
        self._sinks.clear()


#: The process's sinks; the server flushes it every second and closes it at shutdown.
DEFAULT_MANAGER: Final = AccessLogManager()


# -- loggers -----------------------------------------------------------------------------------


class AccessLogger:
    """One configured access log: an optional filter, a formatter and a sink."""

    __slots__ = ("formatter", "log_filter", "name", "sink")

    def __init__(
        self,
        *,
        name: str,
        formatter: Formatter,
        sink: LogSink,
        log_filter: LogFilter | None = None,
    ) -> None:
        self.name = name
        self.formatter = formatter
        self.sink = sink
        self.log_filter = log_filter

    def __repr__(self) -> str:
        return f"<AccessLogger {self.name or '-'} -> {self.sink.path}>"

    def log(self, info: StreamInfo) -> None:
        """Format one finished request into the sink's buffer (no I/O unless 64 KiB wait)."""
        if self.log_filter is not None and not self.log_filter(info):
            return
        self.sink.write(self.formatter.format(info))

    def flush(self) -> None:
        self.sink.flush()


def compile_access_logs(
    protos: Sequence[accesslog_pb2.AccessLog],
    path: str,
    *,
    manager: AccessLogManager | None = None,
) -> tuple[AccessLogger, ...]:
    """Compile ``access_log`` entries of a connection manager (``path`` is their field path).

    Supported ``typed_config``: ``FileAccessLog`` (``path``, ``log_format``; the deprecated
    ``format``/``json_format``/``typed_json_format`` are refused), ``StdoutAccessLog`` and
    ``StderrAccessLog``. Filters: status code, duration, response flag, and/or.
    """
    manager = manager if manager is not None else DEFAULT_MANAGER
    loggers: list[AccessLogger] = []
    problems = ProblemList()  # report every bad entry at once
    for i, proto in enumerate(protos):
        try:
            loggers.append(_compile_one(proto, f"{path}[{i}]", manager))
        except ConfigError as e:
            problems.extend(e)
    problems.raise_if_any()
    return tuple(loggers)


def _compile_one(
    proto: accesslog_pb2.AccessLog, where: str, manager: AccessLogManager
) -> AccessLogger:
    check_fields(proto, where, ("name", "filter", "typed_config"))
    config_path = join(where, "typed_config")
    if not proto.HasField("typed_config"):
        raise ConfigError.at(config_path, "is required (FileAccessLog, StdoutAccessLog, ...)")
    type_name = proto.typed_config.type_url.removeprefix(_TYPE_PREFIX)
    log_format: substitution_format_string_pb2.SubstitutionFormatString | None = None
    if type_name == _FILE_LOG:
        config: Any = file_pb2.FileAccessLog()
        proto.typed_config.Unpack(config)
        check_fields(config, config_path, ("path", "log_format"))
        if not config.path:
            raise ConfigError.at(join(config_path, "path"), "is required")
        sink_path = config.path
    elif type_name in (_STDOUT_LOG, _STDERR_LOG):
        config = (stream_pb2.StdoutAccessLog if type_name == _STDOUT_LOG
                  else stream_pb2.StderrAccessLog)()  # fmt: skip
        proto.typed_config.Unpack(config)
        check_fields(config, config_path, ("log_format",))
        sink_path = "/dev/stdout" if type_name == _STDOUT_LOG else "/dev/stderr"
    else:
        raise ConfigError.at(config_path, f"access logger {type_name} is not supported by meshlet")
    if config.HasField("log_format"):
        log_format = config.log_format
    formatter = compile_log_format(log_format, join(config_path, "log_format"))
    log_filter = (
        compile_filter(proto.filter, join(where, "filter")) if proto.HasField("filter") else None
    )
    sink = manager.sink(sink_path, join(config_path, "path"))
    return AccessLogger(name=proto.name, formatter=formatter, sink=sink, log_filter=log_filter)
