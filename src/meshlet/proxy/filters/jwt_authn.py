"""``envoy.filters.http.jwt_authn``: JSON Web Tokens checked against each provider's keys.

Compiled from ``JwtAuthentication`` (what istiod makes of RequestAuthentication), with Envoy's
rules (envoyproxy.io, "JWT Authentication" filter; ``ENVOY-SEMANTICS.md``):

* A provider takes its token from ``from_headers`` (each with a ``value_prefix``),
  ``from_params`` and ``from_cookies``; with none, from ``Authorization: Bearer <token>`` and the
  ``access_token`` query parameter.
* A token is valid when its signature checks against one of the provider's keys (``local_jwks``
  inline, or ``remote_jwks`` fetched from its URI and cached for ``cache_duration``), its
  ``iss`` is the provider's issuer, its ``aud`` names one of ``audiences`` (when given), and it
  is neither expired nor not yet valid (``clock_skew_seconds``, 60 by default).
* Requirements: ``provider_name``, ``requires_any`` (one passing suffices), ``requires_all``,
  ``allow_missing`` (passes when no token is present, fails on a bad one) and
  ``allow_missing_or_failed`` (always passes). The first rule whose match covers the path
  applies; no rule, no requirement.
* Failure is 401 with ``www-authenticate: Bearer realm="<url>", error="invalid_token"``, except
  a disallowed audience, which is 403. Bodies: ``Jwt is missing``, ``Jwt is expired``, ``Jwt
  verification fails``, ``Jwt issuer is not configured``, ``Audiences in Jwt are not allowed``,
  ``Jwt not yet valid``.
* A verified token is removed from the request unless ``forward``; its payload is kept for
  the stream under ``payload_in_metadata`` (RBAC's ``request.auth.*`` and
  ``requestPrincipals`` read it), ``forward_payload_header`` sends it base64url-encoded, and
  ``claim_to_headers`` copies single claims into request headers.

The keys are checked with PyJWT (``cryptography``), imported only when a proxy has this filter.
A ``remote_jwks`` URI is fetched by the proxy itself (its ``http_uri.cluster`` is not used):
until the first fetch succeeds, every token of that provider fails, as Envoy's do.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from meshlet.errors import ConfigError
from meshlet.proxy.fields import check_fields, duration_field, join

log = logging.getLogger(__name__)

DEFAULT_CLOCK_SKEW = 60
DEFAULT_CACHE_DURATION = 600.0  # remote_jwks.cache_duration: Envoy's default, 5 min ... 10 min
MISSING = "Jwt is missing"
EXPIRED = "Jwt is expired"
NOT_YET_VALID = "Jwt not yet valid"
BAD = "Jwt verification fails"
UNKNOWN_ISSUER = "Jwt issuer is not configured"
BAD_AUDIENCE = "Audiences in Jwt are not allowed"
_FETCHES: set[asyncio.Task[None]] = set()  # key-set fetches in flight (kept referenced)


@dataclass(frozen=True, slots=True)
class Failure:
    status: int
    message: str


@dataclass(slots=True)
class Keys:
    """A provider's key set: inline, or fetched from ``uri`` (and refreshed)."""

    jwks: Any = None  # jwt.PyJWKSet, or None until fetched
    uri: str = ""
    timeout: float = 5.0
    cache_duration: float = DEFAULT_CACHE_DURATION
    fetched_at: float = -1.0
    fetching: bool = False

    def due(self, now: float) -> bool:
        return (
            bool(self.uri)
            and not self.fetching
            and (self.jwks is None or now - self.fetched_at >= self.cache_duration)
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Provider:
    name: str
    issuer: str
    audiences: tuple[str, ...]
    keys: Keys
    from_headers: tuple[tuple[bytes, str], ...]  # (lower-case header name, value prefix)
    from_params: tuple[str, ...]
    forward: bool
    payload_in_metadata: str
    forward_payload_header: bytes
    from_cookies: tuple[str, ...] = ()
    claim_to_headers: tuple[tuple[bytes, str], ...] = ()  # (header, claim name)
    clock_skew: int


@dataclass(frozen=True, slots=True)
class Requirement:
    """``kind``: provider, any, all, allow_missing, allow_missing_or_failed."""

    kind: str
    provider: str = ""
    children: tuple[Requirement, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    prefix: str | None
    path: str | None
    requirement: Requirement

    def matches(self, path: str) -> bool:
        if self.path is not None:
            return path == self.path
        return self.prefix is not None and path.startswith(self.prefix)


@dataclass(slots=True)
class Outcome:
    """What the filter decided for one request."""

    failure: Failure | None = None
    payloads: dict[str, dict[str, Any]] = field(default_factory=dict)  # metadata key -> claims
    strip: list[tuple[bytes, str]] = field(default_factory=list)  # headers carrying used tokens
    add: list[tuple[bytes, bytes]] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class JwtAuthn:
    providers: Mapping[str, Provider]
    rules: tuple[Rule, ...]
    bypass_cors_preflight: bool = False

    # -- the request path --------------------------------------------------------------------

    def check(self, method: str, target: str, headers: Sequence[tuple[bytes, bytes]]) -> Outcome:
        """Apply the first matching rule to a request (its method, target and headers)."""
        self.refresh_keys()
        url = urlsplit(target)
        path = url.path or "/"
        names = {k for k, _ in headers}
        preflight = b"origin" in names and b"access-control-request-method" in names
        if self.bypass_cors_preflight and method == "OPTIONS" and preflight:
            return Outcome()
        rule = next((r for r in self.rules if r.matches(path)), None)
        if rule is None:
            return Outcome()
        query = parse_qsl(url.query, keep_blank_values=True)
        outcome = Outcome()
        verdicts: dict[str, Failure | str | None] = {}  # provider -> failure, None ok, "missing"
        ok = self._satisfied(rule.requirement, headers, query, verdicts, outcome)
        if not ok:
            failures = [v for v in verdicts.values() if isinstance(v, Failure)]
            outcome.failure = failures[-1] if failures else Failure(401, MISSING)
            outcome.payloads.clear()
            outcome.strip.clear()
            outcome.add.clear()
        return outcome

    def _satisfied(
        self,
        req: Requirement,
        headers: Sequence[tuple[bytes, bytes]],
        query: list[tuple[str, str]],
        verdicts: dict[str, Failure | str | None],
        outcome: Outcome,
    ) -> bool:
        if req.kind == "provider":
            if req.provider not in verdicts:
                verdicts[req.provider] = self._verify(req.provider, headers, query, outcome)
            return verdicts[req.provider] is None
        if req.kind == "any":
            results = [self._satisfied(c, headers, query, verdicts, outcome) for c in req.children]
            return any(results)
        if req.kind == "all":
            return all(self._satisfied(c, headers, query, verdicts, outcome) for c in req.children)
        if req.kind == "allow_missing_or_failed":
            return True
        # allow_missing: passes unless a token is present and bad (Envoy: "satisfied if JWT is
        # missing, but failed if JWT is invalid")
        for name in self.providers:
            if name not in verdicts:
                verdicts[name] = self._verify(name, headers, query, outcome)
        return not any(isinstance(v, Failure) for v in verdicts.values())

    def _verify(
        self,
        name: str,
        headers: Sequence[tuple[bytes, bytes]],
        query: list[tuple[str, str]],
        outcome: Outcome,
    ) -> Failure | str | None:
        provider = self.providers[name]
        found = _token(provider, headers, query)
        if found is None:
            return "missing"
        token, carrier = found
        failure, claims = _check(provider, token)
        if failure is not None:
            return failure
        if provider.payload_in_metadata:
            outcome.payloads[provider.payload_in_metadata] = claims
        if not provider.forward and carrier is not None:
            outcome.strip.append(carrier)
        for header, claim in provider.claim_to_headers:
            value = claims.get(claim)
            if isinstance(value, (str, int, float, bool)):
                outcome.add.append((header, str(value).encode()))
        if provider.forward_payload_header:
            raw = json.dumps(claims, separators=(",", ":")).encode()
            outcome.add.append(
                (provider.forward_payload_header, base64.urlsafe_b64encode(raw).rstrip(b"="))
            )
        return None

    # -- keys --------------------------------------------------------------------------------

    def refresh_keys(self) -> None:
        """Start fetching remote key sets that are due (on the running loop, if any)."""
        now = time.monotonic()
        for provider in self.providers.values():
            keys = provider.keys
            if keys.due(now):
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    return
                keys.fetching = True
                task = loop.create_task(_fetch(keys))
                _FETCHES.add(task)
                task.add_done_callback(_FETCHES.discard)


def _token(
    provider: Provider, headers: Sequence[tuple[bytes, bytes]], query: list[tuple[str, str]]
) -> tuple[str, tuple[bytes, str] | None] | None:
    for name, prefix in provider.from_headers:
        for k, v in headers:
            if k != name:
                continue
            value = v.decode("latin-1").strip()
            if prefix:
                if not value.startswith(prefix):
                    continue
                value = value[len(prefix) :].strip()
            if value:
                return value, (name, prefix)
    for param in provider.from_params:
        for key, text in query:
            if key == param and text:
                return text, None
    if provider.from_cookies:
        for header, raw in headers:
            if header != b"cookie":
                continue
            for part in raw.decode("latin-1").split(";"):
                cookie, _, text = part.strip().partition("=")
                if cookie in provider.from_cookies and text:
                    return text, None
    return None


def _check(provider: Provider, token: str) -> tuple[Failure | None, dict[str, Any]]:
    import jwt  # PyJWT, with cryptography: loaded only by proxies that check tokens

    try:
        header = jwt.get_unverified_header(token)
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return Failure(401, BAD), {}
    if unverified.get("iss") != provider.issuer:
        return Failure(401, UNKNOWN_ISSUER), {}
    jwks = provider.keys.jwks
    if jwks is None:
        return Failure(401, BAD), {}
    kid = header.get("kid")
    candidates = [k for k in jwks.keys if kid is None or k.key_id in (None, kid)]
    last: Failure = Failure(401, BAD)
    for key in candidates:
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[header.get("alg", "RS256")],
                audience=list(provider.audiences) or None,
                issuer=provider.issuer,
                leeway=provider.clock_skew,
                options={"verify_aud": bool(provider.audiences)},
            )
        except jwt.ExpiredSignatureError:
            return Failure(401, EXPIRED), {}
        except jwt.ImmatureSignatureError:
            return Failure(401, NOT_YET_VALID), {}
        except jwt.InvalidAudienceError:
            return Failure(403, BAD_AUDIENCE), {}
        except jwt.PyJWTError:
            continue
        return None, dict(claims)
    return last, {}


async def _fetch(keys: Keys) -> None:
    """GET the key set at ``keys.uri`` (http only: a plain HTTP/1.1 request on asyncio)."""
    import jwt

    try:
        url = urlsplit(keys.uri)
        if url.scheme != "http":
            raise ValueError(f"{keys.uri}: only http:// key sets can be fetched")
        port = url.port or 80
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(url.hostname, port), keys.timeout
        )
        try:
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            writer.write(
                f"GET {path} HTTP/1.1\r\nhost: {url.netloc}\r\nconnection: close\r\n\r\n".encode()
            )
            raw = await asyncio.wait_for(reader.read(), keys.timeout)
        finally:
            writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        status = head.split(b" ", 2)[1] if b" " in head else b""
        if status != b"200":
            raise ValueError(f"{keys.uri}: status {status.decode(errors='replace')}")
        keys.jwks = jwt.PyJWKSet.from_json(body.decode())
        keys.fetched_at = time.monotonic()
    except Exception as e:  # keep the last good set; try again on the next request
        log.warning("cannot fetch JWKS %s: %s", keys.uri, e)
        keys.fetched_at = time.monotonic() - keys.cache_duration + 5.0  # retry in 5 s
    finally:
        keys.fetching = False


# -- compilation -------------------------------------------------------------------------------


def compile_jwt_authn(proto: Any, path: str) -> JwtAuthn:
    """Compile a ``JwtAuthentication``; ``ConfigError`` names each unsupported field."""
    import jwt

    check_fields(proto, path, {"providers", "rules", "bypass_cors_preflight"})
    providers: dict[str, Provider] = {}
    for name, p in proto.providers.items():
        ppath = f"{path}.providers[{name}]"
        check_fields(
            p,
            ppath,
            {
                "issuer",
                "audiences",
                "remote_jwks",
                "local_jwks",
                "forward",
                "from_headers",
                "from_params",
                "from_cookies",
                "claim_to_headers",
                "payload_in_metadata",
                "forward_payload_header",
                "clock_skew_seconds",
            },
        )
        keys = Keys()
        if p.HasField("local_jwks"):
            check_fields(p.local_jwks, join(ppath, "local_jwks"), {"inline_string"})
            try:
                keys.jwks = jwt.PyJWKSet.from_json(p.local_jwks.inline_string)
            except (jwt.PyJWTError, ValueError) as e:
                message = f"bad JWKS: {e}"
                raise ConfigError.at(join(ppath, "local_jwks.inline_string"), message) from None
        elif p.HasField("remote_jwks"):
            rpath = join(ppath, "remote_jwks")
            check_fields(p.remote_jwks, rpath, {"http_uri", "cache_duration"})
            keys.uri = p.remote_jwks.http_uri.uri
            keys.timeout = duration_field(p.remote_jwks.http_uri, "timeout", 5.0) or 5.0
            keys.cache_duration = (
                duration_field(p.remote_jwks, "cache_duration", DEFAULT_CACHE_DURATION)
                or DEFAULT_CACHE_DURATION
            )
        else:
            raise ConfigError.at(ppath, "needs local_jwks or remote_jwks")
        from_headers = tuple((h.name.lower().encode(), h.value_prefix) for h in p.from_headers)
        from_params = tuple(p.from_params)
        if not from_headers and not from_params and not p.from_cookies:
            from_headers, from_params = ((b"authorization", "Bearer "),), ("access_token",)
        providers[name] = Provider(
            name=name,
            issuer=p.issuer,
            audiences=tuple(p.audiences),
            keys=keys,
            from_headers=from_headers,
            from_params=from_params,
            forward=p.forward,
            payload_in_metadata=p.payload_in_metadata,
            forward_payload_header=p.forward_payload_header.lower().encode(),
            from_cookies=tuple(p.from_cookies),
            claim_to_headers=tuple(
                (c.header_name.lower().encode(), c.claim_name) for c in p.claim_to_headers
            ),
            clock_skew=p.clock_skew_seconds or DEFAULT_CLOCK_SKEW,
        )
    rules = []
    for i, r in enumerate(proto.rules):
        rpath = f"{path}.rules[{i}]"
        check_fields(r, rpath, {"match", "requires"})
        check_fields(r.match, join(rpath, "match"), {"prefix", "path"})
        which = r.match.WhichOneof("path_specifier")
        rules.append(
            Rule(
                prefix=r.match.prefix if which == "prefix" else None,
                path=r.match.path if which == "path" else None,
                requirement=_requirement(r.requires, join(rpath, "requires"), providers),
            )
        )
    return JwtAuthn(
        providers=providers, rules=tuple(rules), bypass_cors_preflight=proto.bypass_cors_preflight
    )


def _requirement(req: Any, path: str, providers: Mapping[str, Provider]) -> Requirement:
    which = req.WhichOneof("requires_type")
    if which == "provider_name":
        if req.provider_name not in providers:
            raise ConfigError.at(join(path, "provider_name"), f"no provider {req.provider_name!r}")
        return Requirement("provider", provider=req.provider_name)
    if which in ("requires_any", "requires_all"):
        group = getattr(req, which)
        children = tuple(
            _requirement(c, f"{path}.{which}.requirements[{i}]", providers)
            for i, c in enumerate(group.requirements)
        )
        return Requirement("any" if which == "requires_any" else "all", children=children)
    if which == "allow_missing":
        return Requirement("allow_missing")
    if which == "allow_missing_or_failed":
        return Requirement("allow_missing_or_failed")
    raise ConfigError.at(path, f"{which or 'an empty requirement'} is not supported")
