"""The route table: a RouteConfiguration compiled once, consulted for every request.

``compile_route_config`` turns an ``envoy.config.route.v3.RouteConfiguration`` into an
immutable ``RouteTable``; ``RouteTable.select(head)`` picks the virtual host and the route.
Everything a request needs is prepared here, in bytes: domain tables, matchers, header
mutations merged across levels, rewrites, cluster choices. A new configuration builds a new
table; requests in flight keep the one they started with.

Rules kept, from ``ENVOY-SEMANTICS.md`` §1-§4 and ``route_components.proto``:

* Virtual host: exact domain, then suffix wildcards (longest first), then prefix wildcards
  (longest first), then ``*``. A wildcard covers at least one character. Case-insensitive;
  the port is part of the comparison unless ``ignore_port_in_host_matching``.
* Routes are tried in order; the first whose conditions all hold wins.
* Header mutations run weighted cluster -> route -> virtual host -> route configuration
  (reversed above the cluster level by ``most_specific_header_mutations_wins``); within a
  level removals run before additions.
* The request is finalised as Envoy's router does: header mutations, then host rewrite, then
  path rewrite (``Route.finalize_request``).
* Anything in the configuration that meshlet does not implement is refused by field path.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2

from meshlet.errors import ConfigError, ProblemList
from meshlet.proxy.fields import check_fields, duration_field, join, uint_field
from meshlet.proxy.filters.fault import FaultPolicy, compile_fault
from meshlet.proxy.headers import Headers, RequestHead
from meshlet.proxy.matching import (
    PathMatcher,
    RouteMatch,
    compile_regex,
    compile_route_match,
    first_query_value,
    query_less,
)
from meshlet.proxy.retry import RetryPolicy, compile_retry_policy
from meshlet.proxy.upstream.host import stable_hash

FAULT_FILTER = "envoy.filters.http.fault"
FAULT_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
DEFAULT_TIMEOUT = 15.0  # route_components.proto RouteAction.timeout
DEFAULT_MAX_DIRECT_RESPONSE_BODY = 4096  # route.proto max_direct_response_body_size_bytes
_MEMO_LIMIT = 1024  # distinct authorities remembered by RouteTable.select
_MEMO_MAX_KEY = 260  # a DNS name (253) and a port; longer authorities are not remembered

# --------------------------------------------------------------------------- header mutation

# envoy.config.core.v3.HeaderValueOption.HeaderAppendAction
APPEND_IF_EXISTS_OR_ADD = 0
ADD_IF_ABSENT = 1
OVERWRITE_IF_EXISTS_OR_ADD = 2
OVERWRITE_IF_EXISTS = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderAdd:
    """One ``*_headers_to_add`` entry with a literal value."""

    name: bytes
    value: bytes
    action: int = APPEND_IF_EXISTS_OR_ADD


@dataclass(frozen=True, slots=True, kw_only=True)
class MutationLevel:
    """The removals and additions of one configuration level (route, vhost, ...).

    As Envoy's ``HeaderParser::evaluateHeaders``: removals first; then the conditional actions
    are decided against the headers as they stand; then overwrites, then appends.
    ``sets``/``appends`` hold the precomputed outcome when no action is conditional.
    """

    remove: tuple[bytes, ...] = ()
    add: tuple[HeaderAdd, ...] = ()
    conditional: bool = False
    sets: tuple[tuple[bytes, bytes], ...] = ()
    appends: tuple[tuple[bytes, bytes], ...] = ()

    def apply(self, headers: Headers) -> None:
        for name in self.remove:
            headers.remove(name)
        sets: Sequence[tuple[bytes, bytes]] = self.sets
        appends: Sequence[tuple[bytes, bytes]] = self.appends
        if self.conditional:
            sets, appends = self._decide(headers)
        for name, value in sets:
            headers.set(name, value)
        if appends:
            headers.items.extend(appends)  # one list operation instead of a call per header

    def _decide(
        self, headers: Headers
    ) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
        sets: list[tuple[bytes, bytes]] = []
        appends: list[tuple[bytes, bytes]] = []
        for a in self.add:
            action = a.action
            if action == APPEND_IF_EXISTS_OR_ADD:
                appends.append((a.name, a.value))
            elif action == ADD_IF_ABSENT:
                if a.name not in headers:
                    appends.append((a.name, a.value))
            elif action == OVERWRITE_IF_EXISTS_OR_ADD or a.name in headers:
                sets.append((a.name, a.value))
        return sets, appends


def _level(remove: tuple[bytes, ...], add: tuple[HeaderAdd, ...]) -> MutationLevel:
    conditional = any(a.action in (ADD_IF_ABSENT, OVERWRITE_IF_EXISTS) for a in add)
    sets = tuple((a.name, a.value) for a in add if a.action == OVERWRITE_IF_EXISTS_OR_ADD)
    appends = tuple((a.name, a.value) for a in add if a.action == APPEND_IF_EXISTS_OR_ADD)
    return MutationLevel(
        remove=remove,
        add=add,
        conditional=conditional,
        sets=() if conditional else sets,
        appends=() if conditional else appends,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderMutation:
    """Header removals and additions of several levels, already in Envoy's order."""

    levels: tuple[MutationLevel, ...] = ()

    def __repr__(self) -> str:
        removes = sum(len(lv.remove) for lv in self.levels)
        adds = sum(len(lv.add) for lv in self.levels)
        return f"<HeaderMutation {len(self.levels)} levels: -{removes} +{adds}>"

    def __bool__(self) -> bool:
        return bool(self.levels)

    def apply(self, headers: Headers) -> None:
        for level in self.levels:
            level.apply(headers)

    def then(self, *others: HeaderMutation) -> HeaderMutation:
        """This mutation followed by ``others``."""
        levels = self.levels + tuple(lv for o in others for lv in o.levels)
        return HeaderMutation(levels=levels)


EMPTY_MUTATION = HeaderMutation()

_FORBIDDEN_HEADER = "cannot be added or removed: pseudo-headers and host are the proxy's own"
_BAD_VALUE_BYTES = re.compile(rb"[\x00\r\n]")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")  # RFC 9110 token, lower-cased


def _header_name(text: str, path: str) -> bytes:
    name = text.lower().encode()
    if name.startswith(b":") or name == b"host":
        raise ConfigError.at(path, f"{text!r} {_FORBIDDEN_HEADER}")
    if _TOKEN.fullmatch(name) is None:
        raise ConfigError.at(path, f"{text!r} is not a valid header name")
    return name


def literal_value(raw: bytes, path: str) -> bytes:
    """A header value with ``%%`` unescaped; any other ``%`` command is refused (for now)."""
    if _BAD_VALUE_BYTES.search(raw):
        raise ConfigError.at(path, "must not contain NUL, CR or LF")
    if b"%" not in raw:
        return raw
    out = bytearray()
    i = 0
    while i < len(raw):
        c = raw[i : i + 1]
        if c != b"%":
            out += c
            i += 1
        elif raw[i + 1 : i + 2] == b"%":
            out += b"%"
            i += 2
        else:
            end = raw.find(b"%", i + 1)
            if end < 0:
                raise ConfigError.at(path, "has a lone '%'; write '%%' for a literal percent sign")
            command = raw[i : end + 1].decode(errors="replace")
            raise ConfigError.at(
                path, f"uses {command}, which meshlet does not support: only literal values and %%"
            )
    return bytes(out)


def _header_add(msg: Any, path: str) -> HeaderAdd:
    check_fields(msg, path, {"header", "append", "append_action", "keep_empty_value"})
    hv = msg.header
    hpath = join(path, "header")
    check_fields(hv, hpath, {"key", "value", "raw_value"})
    if hv.value and hv.raw_value:
        raise ConfigError.at(hpath, "sets both value and raw_value; set one")
    name = _header_name(hv.key, join(hpath, "key"))
    if hv.raw_value:
        value = literal_value(bytes(hv.raw_value), join(hpath, "raw_value"))
    else:
        value = literal_value(hv.value.encode(), join(hpath, "value"))
    if msg.HasField("append"):
        if msg.append_action != APPEND_IF_EXISTS_OR_ADD:
            raise ConfigError.at(path, "sets both append and append_action; use append_action")
        action = APPEND_IF_EXISTS_OR_ADD if msg.append.value else OVERWRITE_IF_EXISTS_OR_ADD
    else:
        action = int(msg.append_action)
        if action not in (
            APPEND_IF_EXISTS_OR_ADD,
            ADD_IF_ABSENT,
            OVERWRITE_IF_EXISTS_OR_ADD,
            OVERWRITE_IF_EXISTS,
        ):
            raise ConfigError.at(join(path, "append_action"), f"{action} is not a known action")
    return HeaderAdd(name=name, value=value, action=action)


def compile_mutation_level(
    to_add: Any, to_remove: Any, path: str, add_field: str, remove_field: str
) -> HeaderMutation:
    """One level (``*_headers_to_add`` + ``*_headers_to_remove``) as a HeaderMutation."""
    problems = ProblemList()
    removes: list[bytes] = []
    for i, name in enumerate(to_remove):
        try:
            removes.append(_header_name(name, f"{join(path, remove_field)}[{i}]"))
        except ConfigError as e:
            problems.extend(e)
    adds: list[HeaderAdd] = []
    for i, opt in enumerate(to_add):
        try:
            add = _header_add(opt, f"{join(path, add_field)}[{i}]")
        except ConfigError as e:
            problems.extend(e)
            continue
        # Envoy drops an empty value unless keep_empty_value; literal values decide it now.
        if add.value or opt.keep_empty_value:
            adds.append(add)
    problems.raise_if_any()
    if not removes and not adds:
        return EMPTY_MUTATION
    return HeaderMutation(levels=(_level(tuple(removes), tuple(adds)),))


def _mutations(msg: Any, path: str) -> tuple[HeaderMutation, HeaderMutation]:
    """The request and response mutation levels that ``msg`` configures."""
    problems = ProblemList()
    request = response = EMPTY_MUTATION
    try:
        request = compile_mutation_level(
            msg.request_headers_to_add,
            msg.request_headers_to_remove,
            path,
            "request_headers_to_add",
            "request_headers_to_remove",
        )
    except ConfigError as e:
        problems.extend(e)
    try:
        response = compile_mutation_level(
            msg.response_headers_to_add,
            msg.response_headers_to_remove,
            path,
            "response_headers_to_add",
            "response_headers_to_remove",
        )
    except ConfigError as e:
        problems.extend(e)
    problems.raise_if_any()
    return request, response


def _ordered(
    route: HeaderMutation, vhost: HeaderMutation, config: HeaderMutation, most_specific_wins: bool
) -> HeaderMutation:
    # route.proto most_specific_header_mutations_wins: false (default) runs route -> vhost ->
    # config, so the least specific level has the last word; true reverses it.
    if most_specific_wins:
        return config.then(vhost, route)
    return route.then(vhost, config)


# --------------------------------------------------------------------------- rewrites


def _re2_template(src: bytes, groups: int, path: str) -> bytes:
    """An RE2 rewrite string (``\\1``, ``\\\\``) as a Python ``re`` template for bytes."""
    out = bytearray()
    i = 0
    while i < len(src):
        c = src[i : i + 1]
        if c != b"\\":
            out += c
            i += 1
            continue
        nxt = src[i + 1 : i + 2]
        if nxt == b"\\":
            out += b"\\\\"
        elif nxt.isdigit():
            group = int(nxt)
            if group > groups:
                raise ConfigError.at(
                    path, f"refers to group \\{group}, but the pattern has {groups} groups"
                )
            out += b"\\g<%d>" % group
        else:
            raise ConfigError.at(path, "has an invalid escape; use \\0-\\9 or \\\\")
        i += 2
    return bytes(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class PathRewrite:
    """``prefix_rewrite`` or ``regex_rewrite`` of a route or a redirect.

    ``prefix``: the first ``match_length`` bytes of the path (the route's matched prefix or
    path; None: the whole query-less path, for regex routes) become ``prefix``. ``regex``:
    every match in the query-less path is replaced by ``template``; the query is kept; an
    empty result means no rewrite.
    """

    prefix: bytes | None = None
    match_length: int | None = None
    regex: re.Pattern[bytes] | None = None
    template: bytes = b""

    def apply(self, path: bytes) -> bytes | None:
        """The rewritten path, or None when nothing is rewritten."""
        if self.prefix is not None:
            n = self.match_length
            if n is None:
                n = len(query_less(path))
            return self.prefix + path[n:]
        assert self.regex is not None
        just_path = query_less(path)
        new = self.regex.sub(self.template, just_path)
        if not new:
            return None
        return new + path[len(just_path) :]


def _compile_path_rewrite(msg: Any, path: str, matcher: PathMatcher) -> PathRewrite | None:
    """The ``prefix_rewrite``/``regex_rewrite`` of a RouteAction or RedirectAction ``msg``."""
    has_prefix = msg.prefix_rewrite != ""
    has_regex = msg.HasField("regex_rewrite")
    if has_prefix and has_regex:
        raise ConfigError.at(path, "sets both prefix_rewrite and regex_rewrite; set one")
    if has_prefix:
        prefix = _path_value(msg.prefix_rewrite, join(path, "prefix_rewrite"))
        return PathRewrite(prefix=prefix, match_length=matcher.rewrite_length)
    if has_regex:
        rpath = join(path, "regex_rewrite")
        rr = msg.regex_rewrite
        check_fields(rr, rpath, {"pattern", "substitution"})
        regex = compile_regex(rr.pattern, join(rpath, "pattern"))
        spath = join(rpath, "substitution")
        template = _re2_template(_path_value(rr.substitution, spath), regex.groups, spath)
        return PathRewrite(regex=regex, template=template)
    return None


_BAD_PATH_BYTES = re.compile(rb"[\x00-\x20\x7f]")


def _path_value(text: str, path: str) -> bytes:
    """A configured path (or path piece): it goes on the request line, so no spaces/controls."""
    value = text.encode()
    if _BAD_PATH_BYTES.search(value):
        raise ConfigError.at(path, "must not contain spaces or control characters")
    return value


def _host_value(text: str, path: str) -> bytes:
    value = text.encode()
    if not value or _BAD_VALUE_BYTES.search(value) or b" " in value:
        raise ConfigError.at(path, "must be a non-empty host without spaces or control bytes")
    return value


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True, kw_only=True)
class MirrorPolicy:
    """One ``request_mirror_policies`` entry: copy ``fraction`` of requests to ``cluster``."""

    cluster: str
    fraction: float = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterChoice:
    """The upstream cluster picked for one request, with what belongs to that choice.

    ``request_mutation``/``response_mutation``/``host_rewrite`` are a weighted cluster's own
    (empty for a single cluster); ``fault`` is the most specific per-route fault config
    (weighted cluster > route > virtual host), or None.
    """

    name: str
    request_mutation: HeaderMutation = EMPTY_MUTATION
    response_mutation: HeaderMutation = EMPTY_MUTATION
    host_rewrite: bytes | None = None
    fault: FaultPolicy | None = None


_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class HashMethod(ABC):
    """One ``hash_policy`` entry: ``evaluate`` returns a 64-bit hash or None."""

    terminal: bool = False

    @abstractmethod
    def evaluate(self, head: RequestHead, downstream_ip: bytes) -> int | None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderHash(HashMethod):
    name: bytes

    def evaluate(self, head: RequestHead, downstream_ip: bytes) -> int | None:
        if self.name.startswith(b":") or self.name == b"host":
            value = head.header(self.name)
            return None if value is None else stable_hash(value)
        values = head.headers.get_all(self.name)
        if not values:
            return None
        # Envoy sorts the values so that their order does not change the hash.
        return stable_hash(values[0] if len(values) == 1 else b"\x00".join(sorted(values)))


@dataclass(frozen=True, slots=True, kw_only=True)
class CookieHash(HashMethod):
    name: bytes

    def evaluate(self, head: RequestHead, downstream_ip: bytes) -> int | None:
        value = cookie_value(head.headers, self.name)
        return None if value is None else stable_hash(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceIpHash(HashMethod):
    def evaluate(self, head: RequestHead, downstream_ip: bytes) -> int | None:
        return stable_hash(downstream_ip) if downstream_ip else None


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryParameterHash(HashMethod):
    name: bytes

    def evaluate(self, head: RequestHead, downstream_ip: bytes) -> int | None:
        value = first_query_value(head.path, self.name)
        return None if value is None else stable_hash(value)


def cookie_value(headers: Headers, name: bytes) -> bytes | None:
    """The value of cookie ``name`` in the ``cookie`` headers (Envoy's ``parseCookie``)."""
    for header, value in headers:
        if header != b"cookie":
            continue
        for piece in value.split(b";"):
            key, eq, v = piece.partition(b"=")
            if eq and key.lstrip(b" ") == name:
                if len(v) >= 2 and v[:1] == b'"' and v[-1:] == b'"':
                    v = v[1:-1]
                return v
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class HashPolicy:
    """A route's ``hash_policy`` list, combined as Envoy's ``HashPolicyImpl::generateHash``."""

    methods: tuple[HashMethod, ...]

    def compute(self, head: RequestHead, downstream_ip: bytes) -> int | None:
        """The request's hash key, or None when no method produced one."""
        result: int | None = None
        for method in self.methods:
            h = method.evaluate(head, downstream_ip)
            if h is not None:
                # Rotating the previous value keeps two equal rules from cancelling out.
                result = h if result is None else (((result << 1) | (result >> 63)) & _MASK64) ^ h
            if method.terminal and result is not None:
                break
        return result


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteAction:
    """Forward upstream: a compiled ``envoy.config.route.v3.RouteAction``."""

    clusters: tuple[ClusterChoice, ...]  # one for `cluster`; weighted ones in config order
    weight_ends: tuple[int, ...] = ()  # cumulative exclusive ends, weighted clusters only
    total_weight: int = 0
    timeout: float = DEFAULT_TIMEOUT  # seconds, 0 disables
    idle_timeout: float | None = None  # None: the HCM's stream_idle_timeout; 0 disables
    retry_policy: RetryPolicy | None = None
    mirrors: tuple[MirrorPolicy, ...] = ()
    hash_policy: HashPolicy | None = None
    path_rewrite: PathRewrite | None = None
    host_rewrite: bytes | None = None

    def __repr__(self) -> str:
        names = ",".join(c.name for c in self.clusters)
        return f"<RouteAction -> {names} timeout={self.timeout}>"

    def choose_cluster(self, head: RequestHead, rand64: int) -> ClusterChoice:
        """The cluster for this request; ``rand64`` is a per-request random 64-bit integer."""
        if not self.total_weight:
            return self.clusters[0]
        return self.clusters[bisect_right(self.weight_ends, rand64 % self.total_weight)]

    def rewrite(
        self,
        head: RequestHead,
        cluster_host_rewrite: bytes | None = None,
        *,
        suppress_envoy_headers: bool = False,
    ) -> None:
        """Apply the host rewrite, then the path rewrite, to ``head`` in place.

        Call after the header mutations (``Route.finalize_request`` does it all, in order).
        ``cluster_host_rewrite`` is the chosen ``ClusterChoice.host_rewrite``; the route's own
        ``host_rewrite_literal`` wins over it, because Envoy applies it later. The previous
        values go into ``x-envoy-original-host``/``x-envoy-original-path`` (Envoy >= 1.35 for
        the host) unless the router suppresses Envoy's headers.
        """
        host = self.host_rewrite
        if host is None:
            host = cluster_host_rewrite
        if host is not None:
            if not suppress_envoy_headers:
                head.headers.set(b"x-envoy-original-host", head.authority)
            head.authority = host
            if b"host" in head.headers:  # keep a parsed Host header in step with :authority
                head.headers.set(b"host", host)
        rewriter = self.path_rewrite
        if rewriter is not None:
            new_path = rewriter.apply(head.path)
            if new_path is not None:
                if not suppress_envoy_headers:
                    head.headers.set(b"x-envoy-original-path", head.path)
                head.path = new_path


_REDIRECT_CODES = {0: 301, 1: 302, 2: 303, 3: 307, 4: 308}  # RedirectResponseCode


def _request_host(head: RequestHead, new_scheme: bytes, new_port: bytes) -> bytes:
    """The request's host for a redirect, its port dropped as Envoy's ``processRequestHost``."""
    host = head.authority
    if not host:
        return host
    if host[:1] == b"[":
        end = host.rfind(b"]:")
        end = end + 1 if end >= 0 else -1
    else:
        end = host.rfind(b":")
    if end < 0:
        return host
    port = host[end:]
    # Envoy judges the port by x-forwarded-proto (the HCM always sets it).
    proto = (head.headers.get(b"x-forwarded-proto") or head.scheme).lower()
    remove = bool(new_port)
    if new_scheme != proto:
        remove = remove or (proto == b"https" and port == b":443")
        remove = remove or (proto == b"http" and port == b":80")
    return host[:end] if remove else host


@dataclass(frozen=True, slots=True, kw_only=True)
class RedirectAction:
    """Answer with a redirect: a compiled ``envoy.config.route.v3.RedirectAction``."""

    status: int = 301
    scheme: bytes | None = None
    host: bytes | None = None
    port: bytes = b""  # ":8443" or empty
    path: bytes | None = None
    path_has_query: bool = False
    path_rewrite: PathRewrite | None = None
    strip_query: bool = False

    def response(self, head: RequestHead) -> tuple[int, bytes]:
        """``(status, location)``; the response has that ``location`` and an empty body."""
        scheme = self.scheme if self.scheme is not None else head.scheme
        host = self.host if self.host is not None else _request_host(head, scheme, self.port)
        if self.path is not None:
            path = self.path
            if not self.path_has_query:  # the request's query is kept
                q = head.path.find(b"?")
                if q >= 0:
                    path += head.path[q:]
        else:
            path = head.path
            if self.path_rewrite is not None:
                path = self.path_rewrite.apply(path) or path
        if not path.startswith(b"/"):
            path = b"/" + path
        if self.strip_query and not self.path_has_query:
            q = path.find(b"?")
            if q >= 0:
                path = path[:q]
        return self.status, b"%s://%s%s%s" % (scheme, host, self.port, path)


@dataclass(frozen=True, slots=True, kw_only=True)
class DirectResponseAction:
    """Answer locally: a compiled ``envoy.config.route.v3.DirectResponseAction``."""

    status: int
    body: bytes = b""

    def location(self, head: RequestHead) -> bytes | None:
        """Envoy adds ``location`` (the request's own URL) to 201 and 3xx direct responses."""
        if self.status != 201 and not 300 <= self.status < 400:
            return None
        host = _request_host(head, head.scheme, b"")
        path = head.path if head.path.startswith(b"/") else b"/" + head.path
        return b"%s://%s%s" % (head.scheme, host, path)


# --------------------------------------------------------------------------- routes, vhosts


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """One route: its match, its action, and what it does to headers.

    ``request_mutation``/``response_mutation`` merge the route, virtual host and route
    configuration levels in Envoy's order (a weighted cluster's own level is on the
    ``ClusterChoice``). ``fault`` is the per-route ``envoy.filters.http.fault`` config
    (route > virtual host), or None.
    """

    name: str
    match: RouteMatch
    action: RouteAction | RedirectAction | DirectResponseAction
    request_mutation: HeaderMutation = EMPTY_MUTATION
    response_mutation: HeaderMutation = EMPTY_MUTATION
    fault: FaultPolicy | None = None

    def __repr__(self) -> str:
        return f"<Route {self.name!r} {type(self.action).__name__}>"

    def finalize_request(
        self, head: RequestHead, choice: ClusterChoice, *, suppress_envoy_headers: bool = False
    ) -> None:
        """Prepare ``head`` for upstream as Envoy's router does (forwarding routes only).

        The weighted cluster's headers, then the route/vhost/config headers, then the host
        rewrite, then the path rewrite (``config_impl.cc`` ``finalizeRequestHeaders``).
        """
        action = self.action
        assert isinstance(action, RouteAction)
        headers = head.headers
        # Hot path: most routes mutate nothing and rewrite nothing; skip the calls then.
        if choice.request_mutation.levels:
            choice.request_mutation.apply(headers)
        if self.request_mutation.levels:
            self.request_mutation.apply(headers)
        if (
            action.host_rewrite is not None
            or action.path_rewrite is not None
            or choice.host_rewrite
        ):
            action.rewrite(head, choice.host_rewrite, suppress_envoy_headers=suppress_envoy_headers)

    def finalize_response(self, headers: Headers, choice: ClusterChoice | None = None) -> None:
        """Apply the response mutations: the weighted cluster's first, then the route's."""
        if choice is not None and choice.response_mutation.levels:
            choice.response_mutation.apply(headers)
        if self.response_mutation.levels:
            self.response_mutation.apply(headers)


@dataclass(frozen=True, slots=True, kw_only=True)
class VirtualHost:
    """A compiled virtual host.

    ``response_mutation`` (virtual host + route configuration levels) is for answers given
    without a route, such as 404 NR.
    """

    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]
    response_mutation: HeaderMutation = EMPTY_MUTATION

    def __repr__(self) -> str:
        return f"<VirtualHost {self.name!r} domains={list(self.domains)} routes={len(self.routes)}>"


@dataclass(frozen=True, slots=True, kw_only=True)
class Selection:
    """What ``RouteTable.select`` found: a virtual host, and its route or None (404 NR)."""

    virtual_host: VirtualHost
    route: Route | None


@dataclass(frozen=True, slots=True, kw_only=True)
class _VhostEntry:
    """A virtual host as ``select`` walks it: the prebuilt Selection of every route."""

    routes: tuple[tuple[RouteMatch, Selection], ...]
    no_route: Selection


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class RouteTable:
    """An immutable, compiled RouteConfiguration (compared by identity).

    ``validate_clusters`` is the configured value, None when unset (Envoy's default is true
    for an inline route_config, false for RDS). ``memo`` is the only mutable part: a cache of
    ``_lookup``, which is a pure function of the authority.
    """

    name: str
    virtual_hosts: tuple[VirtualHost, ...]
    validate_clusters: bool | None = None
    ignore_port: bool = False
    exact: dict[bytes, _VhostEntry] = field(default_factory=dict, repr=False)
    # (length of the fixed part, {fixed part: entry}), longest first
    suffixes: tuple[tuple[int, dict[bytes, _VhostEntry]], ...] = field(default=(), repr=False)
    prefixes: tuple[tuple[int, dict[bytes, _VhostEntry]], ...] = field(default=(), repr=False)
    default: _VhostEntry | None = field(default=None, repr=False)
    default_only: bool = field(default=True, repr=False)
    clusters: frozenset[str] = field(default=frozenset(), repr=False)
    # authority -> entry, memoised: a mesh sees few distinct authorities, and one dict lookup
    # beats lower() + port stripping + the wildcard tables. Cleared when it grows too big.
    memo: dict[bytes, _VhostEntry | None] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        routes = sum(len(vh.routes) for vh in self.virtual_hosts)
        return f"<RouteTable {self.name!r} [{len(self.virtual_hosts)} vhosts, {routes} routes]>"

    def select(self, head: RequestHead) -> Selection | None:
        """The virtual host and route for ``head``; None when no virtual host matches."""
        entry = self.default if self.default_only else self._find(head.authority)
        if entry is None:
            return None
        for match, selection in entry.routes:
            if match.matches(head):
                return selection
        return entry.no_route

    def _find(self, authority: bytes) -> _VhostEntry | None:
        memo = self.memo
        try:
            return memo[authority]
        except KeyError:
            pass
        entry = self._lookup(authority)
        if len(authority) <= _MEMO_MAX_KEY:  # bounded memory: <= ~300 KiB of keys
            if len(memo) >= _MEMO_LIMIT:
                memo.clear()
            memo[authority] = entry
        return entry

    def _lookup(self, authority: bytes) -> _VhostEntry | None:
        host = authority.lower()
        if self.ignore_port:
            host = _strip_port(host)
        entry = self.exact.get(host)
        if entry is not None:
            return entry
        n = len(host)
        for length, table in self.suffixes:
            if length < n:  # a wildcard covers at least one character
                entry = table.get(host[n - length :])
                if entry is not None:
                    return entry
        for length, table in self.prefixes:
            if length < n:
                entry = table.get(host[:length])
                if entry is not None:
                    return entry
        return self.default

    def referenced_clusters(self) -> set[str]:
        """Every cluster a route names, weighted and mirror clusters included."""
        return set(self.clusters)


def _strip_port(host: bytes) -> bytes:
    # Envoy's HeaderUtility::getPortStart: the last ':' unless it is inside [v6].
    colon = host.rfind(b":")
    if colon < 0:
        return host
    bracket = host.rfind(b"]")
    if bracket < 0 or bracket < colon:
        return host[:colon]
    return host


# --------------------------------------------------------------------------- compiling


@dataclass(frozen=True, slots=True, kw_only=True)
class _Context:
    """What the levels above a route contribute to it."""

    config_request: HeaderMutation
    config_response: HeaderMutation
    most_specific_wins: bool
    max_body: int
    vhost_request: HeaderMutation = EMPTY_MUTATION
    vhost_response: HeaderMutation = EMPTY_MUTATION
    vhost_retry: RetryPolicy | None = None
    vhost_mirrors: tuple[MirrorPolicy, ...] = ()
    vhost_fault: FaultPolicy | None = None


_ROUTE_CONFIG_FIELDS = {
    "name",
    "virtual_hosts",
    "request_headers_to_add",
    "request_headers_to_remove",
    "response_headers_to_add",
    "response_headers_to_remove",
    "most_specific_header_mutations_wins",
    "validate_clusters",
    "ignore_port_in_host_matching",
    "max_direct_response_body_size_bytes",
}

_VHOST_FIELDS = {
    "name",
    "domains",
    "routes",
    "request_headers_to_add",
    "request_headers_to_remove",
    "response_headers_to_add",
    "response_headers_to_remove",
    "retry_policy",
    "request_mirror_policies",
    "typed_per_filter_config",
    "require_tls",
}

_ROUTE_FIELDS = {
    "name",
    "match",
    "route",
    "redirect",
    "direct_response",
    "request_headers_to_add",
    "request_headers_to_remove",
    "response_headers_to_add",
    "response_headers_to_remove",
    "typed_per_filter_config",
}

_ACTION_FIELDS = {
    "cluster",
    "weighted_clusters",
    "prefix_rewrite",
    "regex_rewrite",
    "host_rewrite_literal",
    "timeout",
    "idle_timeout",
    "retry_policy",
    "request_mirror_policies",
    "hash_policy",
}

_CLUSTER_WEIGHT_FIELDS = {
    "name",
    "weight",
    "request_headers_to_add",
    "request_headers_to_remove",
    "response_headers_to_add",
    "response_headers_to_remove",
    "typed_per_filter_config",
    "host_rewrite_literal",
}


def compile_route_config(proto: route_pb2.RouteConfiguration, path: str) -> RouteTable:
    """Compile a RouteConfiguration; ``ConfigError`` lists every problem by field path."""
    problems = ProblemList()
    try:
        check_fields(proto, path, _ROUTE_CONFIG_FIELDS)
    except ConfigError as e:
        problems.extend(e)
    config_request = config_response = EMPTY_MUTATION
    try:
        config_request, config_response = _mutations(proto, path)
    except ConfigError as e:
        problems.extend(e)
    ctx = _Context(
        config_request=config_request,
        config_response=config_response,
        most_specific_wins=proto.most_specific_header_mutations_wins,
        max_body=uint_field(
            proto, "max_direct_response_body_size_bytes", DEFAULT_MAX_DIRECT_RESPONSE_BODY
        ),
    )

    vhosts: list[VirtualHost] = []
    exact: dict[bytes, _VhostEntry] = {}
    suffixes: dict[int, dict[bytes, _VhostEntry]] = {}
    prefixes: dict[int, dict[bytes, _VhostEntry]] = {}
    default: _VhostEntry | None = None
    seen: dict[bytes, str] = {}  # lower-cased domain -> vhost name, across the whole config
    clusters: set[str] = set()
    for i, vh_proto in enumerate(proto.virtual_hosts):
        vpath = f"{join(path, 'virtual_hosts')}[{i}]"
        try:
            vh = _compile_vhost(vh_proto, vpath, ctx, clusters)
        except ConfigError as e:
            problems.extend(e)
            continue
        vhosts.append(vh)
        entry = _VhostEntry(
            routes=tuple((r.match, Selection(virtual_host=vh, route=r)) for r in vh.routes),
            no_route=Selection(virtual_host=vh, route=None),
        )
        # Domains: route_components.proto VirtualHost.domains; config_impl.cc RouteMatcher.
        for j, domain in enumerate(vh.domains):
            d = domain.lower().encode()
            if d in seen:
                problems.add(
                    f"{vpath}.domains[{j}]",
                    f"{domain!r} is already a domain of virtual host {seen[d]!r}",
                )
                continue
            seen[d] = vh.name
            if d == b"*":
                default = entry
            elif d.startswith(b"*"):
                suffixes.setdefault(len(d) - 1, {})[d[1:]] = entry
            elif d.endswith(b"*"):
                prefixes.setdefault(len(d) - 1, {})[d[:-1]] = entry
            else:
                exact[d] = entry
    problems.raise_if_any()

    return RouteTable(
        name=proto.name,
        virtual_hosts=tuple(vhosts),
        validate_clusters=(
            proto.validate_clusters.value if proto.HasField("validate_clusters") else None
        ),
        ignore_port=proto.ignore_port_in_host_matching,
        exact=exact,
        suffixes=tuple(sorted(suffixes.items(), reverse=True)),
        prefixes=tuple(sorted(prefixes.items(), reverse=True)),
        default=default,
        default_only=not (exact or suffixes or prefixes),
        clusters=frozenset(clusters),
    )


def _compile_vhost(msg: Any, path: str, ctx: _Context, clusters: set[str]) -> VirtualHost:
    problems = ProblemList()
    try:
        check_fields(msg, path, _VHOST_FIELDS)
    except ConfigError as e:
        problems.extend(e)
    if not msg.name:
        problems.add(join(path, "name"), "must not be empty")
    if not msg.domains:
        problems.add(join(path, "domains"), "must list at least one domain")
    if msg.require_tls != 0:
        problems.add(join(path, "require_tls"), "is not supported by meshlet (only NONE)")
    request = response = EMPTY_MUTATION
    retry = fault = None
    mirrors: tuple[MirrorPolicy, ...] = ()
    try:
        request, response = _mutations(msg, path)
    except ConfigError as e:
        problems.extend(e)
    try:
        if msg.HasField("retry_policy"):
            retry = compile_retry_policy(msg.retry_policy, join(path, "retry_policy"))
    except ConfigError as e:
        problems.extend(e)
    try:
        mirrors = _compile_mirrors(msg.request_mirror_policies, path, clusters)
    except ConfigError as e:
        problems.extend(e)
    try:
        fault = _compile_per_filter(msg, path)
    except ConfigError as e:
        problems.extend(e)
    ctx = replace(
        ctx,
        vhost_request=request,
        vhost_response=response,
        vhost_retry=retry,
        vhost_mirrors=mirrors,
        vhost_fault=fault,
    )
    routes: list[Route] = []
    for i, r in enumerate(msg.routes):
        try:
            routes.append(_compile_route(r, f"{join(path, 'routes')}[{i}]", ctx, clusters))
        except ConfigError as e:
            problems.extend(e)
    problems.raise_if_any()
    return VirtualHost(
        name=msg.name,
        domains=tuple(msg.domains),
        routes=tuple(routes),
        response_mutation=_ordered(
            EMPTY_MUTATION, response, ctx.config_response, ctx.most_specific_wins
        ),
    )


def _compile_route(msg: Any, path: str, ctx: _Context, clusters: set[str]) -> Route:
    check_fields(msg, path, _ROUTE_FIELDS)
    if not msg.HasField("match"):
        raise ConfigError.at(join(path, "match"), "is required")
    match = compile_route_match(msg.match, join(path, "match"))
    request, response = _mutations(msg, path)
    fault = _compile_per_filter(msg, path)
    if fault is None:  # most specific wins: route > virtual host
        fault = ctx.vhost_fault
    kind = msg.WhichOneof("action")
    action: RouteAction | RedirectAction | DirectResponseAction
    if kind == "route":
        action = _compile_route_action(
            msg.route, join(path, "route"), ctx, match.path, fault, clusters
        )
    elif kind == "redirect":
        action = _compile_redirect(msg.redirect, join(path, "redirect"), match.path)
    elif kind == "direct_response":
        action = _compile_direct_response(
            msg.direct_response, join(path, "direct_response"), ctx.max_body
        )
    else:
        raise ConfigError.at(path, "needs an action: route, redirect or direct_response")
    return Route(
        name=msg.name,
        match=match,
        action=action,
        request_mutation=_ordered(
            request, ctx.vhost_request, ctx.config_request, ctx.most_specific_wins
        ),
        response_mutation=_ordered(
            response, ctx.vhost_response, ctx.config_response, ctx.most_specific_wins
        ),
        fault=fault,
    )


def _compile_route_action(
    msg: Any,
    path: str,
    ctx: _Context,
    matcher: PathMatcher,
    fault: FaultPolicy | None,
    clusters: set[str],
) -> RouteAction:
    check_fields(msg, path, _ACTION_FIELDS)
    kind = msg.WhichOneof("cluster_specifier")
    choices: tuple[ClusterChoice, ...]
    ends: tuple[int, ...] = ()
    total = 0
    if kind == "cluster":
        if not msg.cluster:
            raise ConfigError.at(join(path, "cluster"), "must not be empty")
        clusters.add(msg.cluster)
        choices = (ClusterChoice(name=msg.cluster, fault=fault),)
    elif kind == "weighted_clusters":
        choices, ends, total = _compile_weighted(
            msg.weighted_clusters, join(path, "weighted_clusters"), fault, clusters
        )
    else:
        raise ConfigError.at(path, "needs cluster or weighted_clusters")

    retry = ctx.vhost_retry  # a route's policy replaces the vhost's entirely (no merge)
    if msg.HasField("retry_policy"):
        retry = compile_retry_policy(msg.retry_policy, join(path, "retry_policy"))
    mirrors = _compile_mirrors(msg.request_mirror_policies, path, clusters) or ctx.vhost_mirrors
    hash_policy = None
    if msg.hash_policy:
        hash_policy = _compile_hash_policy(msg.hash_policy, join(path, "hash_policy"))
    host = None
    if msg.WhichOneof("host_rewrite_specifier") == "host_rewrite_literal":
        host = _host_value(msg.host_rewrite_literal, join(path, "host_rewrite_literal"))
    timeout = duration_field(msg, "timeout", DEFAULT_TIMEOUT)
    idle_timeout = duration_field(msg, "idle_timeout", None)
    assert timeout is not None
    for name, value in (("timeout", timeout), ("idle_timeout", idle_timeout)):
        if value is not None and value < 0:
            raise ConfigError.at(join(path, name), "must not be negative")
    return RouteAction(
        clusters=choices,
        weight_ends=ends,
        total_weight=total,
        timeout=timeout,
        idle_timeout=idle_timeout,
        retry_policy=retry,
        mirrors=mirrors,
        hash_policy=hash_policy,
        path_rewrite=_compile_path_rewrite(msg, path, matcher),
        host_rewrite=host,
    )


def _compile_weighted(
    msg: Any, path: str, fault: FaultPolicy | None, clusters: set[str]
) -> tuple[tuple[ClusterChoice, ...], tuple[int, ...], int]:
    check_fields(msg, path, {"clusters", "total_weight"})
    if not msg.clusters:
        raise ConfigError.at(join(path, "clusters"), "must list at least one cluster")
    problems = ProblemList()
    choices: list[ClusterChoice] = []
    ends: list[int] = []
    total = 0
    for i, cw in enumerate(msg.clusters):
        cpath = f"{join(path, 'clusters')}[{i}]"
        try:
            check_fields(cw, cpath, _CLUSTER_WEIGHT_FIELDS)
            if not cw.name:
                raise ConfigError.at(join(cpath, "name"), "must not be empty")
            request, response = _mutations(cw, cpath)
            host = None
            if cw.WhichOneof("host_rewrite_specifier") == "host_rewrite_literal":
                host = _host_value(cw.host_rewrite_literal, join(cpath, "host_rewrite_literal"))
            own_fault = _compile_per_filter(cw, cpath)
        except ConfigError as e:
            problems.extend(e)
            continue
        clusters.add(cw.name)
        weight = uint_field(cw, "weight", 0)
        if weight == 0:
            continue  # never picked (weighted_cluster_specifier.cc)
        total += weight
        ends.append(total)
        choices.append(
            ClusterChoice(
                name=cw.name,
                request_mutation=request,
                response_mutation=response,
                host_rewrite=host,
                fault=fault if own_fault is None else own_fault,
            )
        )
    problems.raise_if_any()
    if total == 0 or total > 0xFFFFFFFF:
        raise ConfigError.at(
            join(path, "clusters"), f"weights must sum to between 1 and 4294967295, not {total}"
        )
    if msg.HasField("total_weight") and msg.total_weight.value != total:
        raise ConfigError.at(
            join(path, "total_weight"),
            f"is {msg.total_weight.value} but the weights sum to {total}; "
            "leave it unset (it is deprecated)",
        )
    return tuple(choices), tuple(ends), total


def _compile_mirrors(policies: Any, path: str, clusters: set[str]) -> tuple[MirrorPolicy, ...]:
    result: list[MirrorPolicy] = []
    for i, p in enumerate(policies):
        ppath = f"{join(path, 'request_mirror_policies')}[{i}]"
        check_fields(p, ppath, {"cluster", "runtime_fraction"})
        if not p.cluster:
            raise ConfigError.at(join(ppath, "cluster"), "must not be empty")
        fraction = 1.0  # no runtime_fraction: every request
        if p.HasField("runtime_fraction"):
            rpath = join(ppath, "runtime_fraction")
            check_fields(p.runtime_fraction, rpath, {"default_value"})
            fraction = fractional_percent(
                p.runtime_fraction.default_value, join(rpath, "default_value")
            )
        clusters.add(p.cluster)
        result.append(MirrorPolicy(cluster=p.cluster, fraction=fraction))
    return tuple(result)


_DENOMINATORS = {0: 100, 1: 10_000, 2: 1_000_000}  # envoy.type.v3.FractionalPercent


def fractional_percent(msg: Any, path: str) -> float:
    """An ``envoy.type.v3.FractionalPercent`` as a fraction in [0, 1]."""
    check_fields(msg, path, {"numerator", "denominator"})
    denominator = _DENOMINATORS.get(msg.denominator)
    if denominator is None:
        raise ConfigError.at(join(path, "denominator"), "must be HUNDRED, TEN_THOUSAND or MILLION")
    return min(float(msg.numerator) / denominator, 1.0)


_HASH_FIELDS = {"header", "cookie", "connection_properties", "query_parameter", "terminal"}


def _compile_hash_policy(policies: Any, path: str) -> HashPolicy | None:
    methods: list[HashMethod] = []
    for i, p in enumerate(policies):
        ppath = f"{path}[{i}]"
        check_fields(p, ppath, _HASH_FIELDS)
        terminal = bool(p.terminal)
        kind = p.WhichOneof("policy_specifier")
        if kind == "header":
            hpath = join(ppath, "header")
            check_fields(p.header, hpath, {"header_name"})
            if not p.header.header_name:
                raise ConfigError.at(join(hpath, "header_name"), "must not be empty")
            name = p.header.header_name.lower().encode()
            methods.append(HeaderHash(name=name, terminal=terminal))
        elif kind == "cookie":
            cpath = join(ppath, "cookie")
            if p.cookie.HasField("ttl"):
                raise ConfigError.at(
                    join(cpath, "ttl"),
                    "is not supported by meshlet: it does not generate cookies; "
                    "without ttl, requests without the cookie get no hash",
                )
            # path and attributes only shape a generated cookie: without ttl Envoy ignores
            # them too.
            check_fields(p.cookie, cpath, {"name", "path", "attributes"})
            if not p.cookie.name:
                raise ConfigError.at(join(cpath, "name"), "must not be empty")
            methods.append(CookieHash(name=p.cookie.name.encode(), terminal=terminal))
        elif kind == "connection_properties":
            cpath = join(ppath, "connection_properties")
            check_fields(p.connection_properties, cpath, {"source_ip"})
            if p.connection_properties.source_ip:  # false adds no method, as in Envoy
                methods.append(SourceIpHash(terminal=terminal))
        elif kind == "query_parameter":
            qpath = join(ppath, "query_parameter")
            check_fields(p.query_parameter, qpath, {"name"})
            if not p.query_parameter.name:
                raise ConfigError.at(join(qpath, "name"), "must not be empty")
            methods.append(
                QueryParameterHash(name=p.query_parameter.name.encode(), terminal=terminal)
            )
        else:
            raise ConfigError.at(
                ppath, "needs one of header, cookie, connection_properties or query_parameter"
            )
    return HashPolicy(methods=tuple(methods)) if methods else None


_REDIRECT_FIELDS = {
    "https_redirect",
    "scheme_redirect",
    "host_redirect",
    "port_redirect",
    "path_redirect",
    "prefix_rewrite",
    "regex_rewrite",
    "response_code",
    "strip_query",
}


def _compile_redirect(msg: Any, path: str, matcher: PathMatcher) -> RedirectAction:
    check_fields(msg, path, _REDIRECT_FIELDS)
    scheme = None
    if msg.WhichOneof("scheme_rewrite_specifier") == "scheme_redirect":
        scheme = msg.scheme_redirect.lower().encode() or None
    elif msg.https_redirect:
        scheme = b"https"
    host = None
    if msg.host_redirect:
        host = _host_value(msg.host_redirect, join(path, "host_redirect"))
    if msg.port_redirect > 65535:
        raise ConfigError.at(join(path, "port_redirect"), "must be a port number (1-65535)")
    port = b":%d" % msg.port_redirect if msg.port_redirect else b""
    status = _REDIRECT_CODES.get(msg.response_code)
    if status is None:
        raise ConfigError.at(join(path, "response_code"), "is not a known RedirectResponseCode")
    new_path = None
    if msg.WhichOneof("path_rewrite_specifier") == "path_redirect":
        new_path = _path_value(msg.path_redirect, join(path, "path_redirect"))
    return RedirectAction(
        status=status,
        scheme=scheme,
        host=host,
        port=port,
        path=new_path,
        path_has_query=new_path is not None and b"?" in new_path,
        path_rewrite=_compile_path_rewrite(msg, path, matcher),
        strip_query=msg.strip_query,
    )


def _compile_direct_response(msg: Any, path: str, max_body: int) -> DirectResponseAction:
    check_fields(msg, path, {"status", "body"})
    if not 200 <= msg.status < 600:
        raise ConfigError.at(join(path, "status"), f"must be in [200, 600), not {msg.status}")
    body = b""
    if msg.HasField("body"):
        bpath = join(path, "body")
        check_fields(msg.body, bpath, {"inline_string", "inline_bytes"})
        kind = msg.body.WhichOneof("specifier")
        if kind == "inline_string":
            body = msg.body.inline_string.encode()
        elif kind == "inline_bytes":
            body = bytes(msg.body.inline_bytes)
        if len(body) > max_body:
            raise ConfigError.at(
                bpath,
                f"is {len(body)} bytes, more than max_direct_response_body_size_bytes ({max_body})",
            )
    return DirectResponseAction(status=msg.status, body=body)


def _compile_per_filter(msg: Any, path: str) -> FaultPolicy | None:
    """The fault override in ``msg.typed_per_filter_config``; any other filter is refused."""
    configs = msg.typed_per_filter_config
    if not configs:
        return None
    problems = ProblemList()
    fault = None
    for key in sorted(configs):
        kpath = f'{join(path, "typed_per_filter_config")}["{key}"]'
        if key != FAULT_FILTER:
            problems.add(kpath, f"is not supported by meshlet (only {FAULT_FILTER})")
            continue
        packed = configs[key]
        if packed.type_url != FAULT_TYPE_URL:
            problems.add(kpath, f"must be a {FAULT_TYPE_URL}, not {packed.type_url}")
            continue
        proto = fault_pb2.HTTPFault()
        if not packed.Unpack(proto):
            problems.add(kpath, "could not be decoded as an HTTPFault")
            continue
        try:
            fault = compile_fault(proto, kpath)
        except ConfigError as e:
            problems.extend(e)
    problems.raise_if_any()
    return fault
