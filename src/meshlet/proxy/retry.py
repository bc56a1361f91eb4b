"""Retry policy: which failed attempts are tried again, how often, and after what pause.

``compile_retry_policy`` turns a route's ``RetryPolicy`` into a frozen ``RetryPolicy``;
the router keeps one ``RetryState`` per request and asks it after every failed attempt.

Rules kept (Envoy's ``source/common/router/retry_state_impl.cc``, router filter docs):

* A response status is retried when a ``retry_on`` condition covers it: ``5xx`` (500-599),
  ``gateway-error`` (502, 503, 504), ``retriable-4xx`` (409), ``retriable-status-codes``
  (the policy's list), or a gRPC condition covers the response's ``grpc-status``. A response
  carrying ``x-envoy-ratelimited`` is never retried (``envoy-ratelimited`` is not supported).
* A failure without a response (an ``Outcome``) is retried under ``5xx``, ``gateway-error``
  and ``reset``; ``reset-before-request`` covers only failures before any request byte was
  sent (connect failures included); ``connect-failure`` covers connect failures and connect
  timeouts. A per-try timeout is a local reset after the request was sent. Circuit-breaker
  overflow is never retried.
* Each granted retry consumes one of ``num_retries``. When a condition matches but none is
  left, ``exhausted`` becomes true (the router sets flag URX).
* Back-off before retry N is fully jittered: uniform in ``[0, (2^N - 1) * base)``, capped at
  ``max_interval``; the exponent stops growing once the range passes ``max_interval``.

The gRPC conditions (``cancelled``, ``deadline-exceeded``, ``internal``,
``resource-exhausted``, ``unavailable``) are accepted because Istio's default retry policy
names two of them; they match only responses that carry a ``grpc-status`` header.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from envoy.config.route.v3 import route_components_pb2

from meshlet.errors import ConfigError
from meshlet.proxy.fields import check_fields, duration_field, join, uint_field

PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"
PREVIOUS_HOSTS_TYPE = (
    "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
)
DEFAULT_BASE_INTERVAL = 0.025  # runtime upstream.base_retry_backoff_ms default

_HTTP_CONDITIONS = (
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
)
_GRPC_CONDITIONS = {  # retry_on name -> grpc-status code
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}
SUPPORTED_RETRY_ON = frozenset(_HTTP_CONDITIONS) | frozenset(_GRPC_CONDITIONS)
_GATEWAY_ERRORS = frozenset({502, 503, 504})


class Outcome(enum.Enum):
    """How an attempt failed when no response (status) came back."""

    CONNECT_FAILURE = "connect-failure"  # refused, unreachable, or connect timeout
    RESET_BEFORE_REQUEST = "reset-before-request"  # connection lost before any request byte
    RESET = "reset"  # connection lost after the request (or part of it) was sent
    PER_TRY_TIMEOUT = "per-try-timeout"  # the attempt was reset by its per-try timer
    OVERFLOW = "overflow"  # a circuit breaker refused: never retried


# Which retry_on conditions cover each outcome (RetryStateImpl::wouldRetryFromReset).
_RESETS = frozenset({"5xx", "gateway-error", "reset"})
OUTCOME_CONDITIONS: dict[Outcome, frozenset[str]] = {
    Outcome.CONNECT_FAILURE: _RESETS | {"reset-before-request", "connect-failure"},
    Outcome.RESET_BEFORE_REQUEST: _RESETS | {"reset-before-request"},
    Outcome.RESET: _RESETS,
    Outcome.PER_TRY_TIMEOUT: _RESETS,
    Outcome.OVERFLOW: frozenset(),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """A route's compiled retry policy. The default value retries nothing."""

    retry_on: frozenset[str] = frozenset()
    num_retries: int = 1
    per_try_timeout: float | None = None  # seconds; None: only the route timeout applies
    base_interval: float = DEFAULT_BASE_INTERVAL
    max_interval: float = 10 * DEFAULT_BASE_INTERVAL
    retriable_status_codes: frozenset[int] = frozenset()
    previous_hosts: bool = False  # the previous_hosts retry host predicate
    host_selection_max_attempts: int = 1  # picks before a rejected host is accepted

    def retries_status(self, status: int, grpc_status: int | None = None) -> bool:
        """Whether a response with ``status`` (and ``grpc-status``) meets a condition."""
        on = self.retry_on
        if 500 <= status < 600 and "5xx" in on:
            return True
        if status in _GATEWAY_ERRORS and "gateway-error" in on:
            return True
        if status == 409 and "retriable-4xx" in on:
            return True
        if "retriable-status-codes" in on and status in self.retriable_status_codes:
            return True
        if grpc_status is not None:
            for name, code in _GRPC_CONDITIONS.items():
                if code == grpc_status and name in on:
                    return True
        return False

    def retries_outcome(self, outcome: Outcome) -> bool:
        """Whether a failure without a response meets a condition."""
        return not self.retry_on.isdisjoint(OUTCOME_CONDITIONS[outcome])


NO_RETRY = RetryPolicy()

_FIELDS = frozenset(
    {
        "retry_on",
        "num_retries",
        "per_try_timeout",
        "retry_host_predicate",
        "host_selection_retry_max_attempts",
        "retriable_status_codes",
        "retry_back_off",
    }
)


def compile_retry_policy(proto: route_components_pb2.RetryPolicy, path: str) -> RetryPolicy:
    """Compile a route's or virtual host's ``retry_policy``; raises ``ConfigError``."""
    check_fields(proto, path, _FIELDS)
    conditions = frozenset(c.strip() for c in proto.retry_on.split(",") if c.strip())
    unknown = sorted(conditions - SUPPORTED_RETRY_ON)
    if unknown:
        supported = ", ".join([*_HTTP_CONDITIONS, *_GRPC_CONDITIONS])
        raise ConfigError.at(
            join(path, "retry_on"),
            f"{', '.join(unknown)} is not supported (supported: {supported})",
        )
    for code in proto.retriable_status_codes:
        if not 100 <= code < 600:
            raise ConfigError.at(
                join(path, "retriable_status_codes"), f"{code} is not an HTTP status code"
            )

    base = DEFAULT_BASE_INTERVAL
    maximum: float | None = None
    if proto.HasField("retry_back_off"):
        back_off = proto.retry_back_off
        bpath = join(path, "retry_back_off")
        check_fields(back_off, bpath, {"base_interval", "max_interval"})
        base_value = duration_field(back_off, "base_interval", None)
        if base_value is None or base_value <= 0:
            raise ConfigError.at(join(bpath, "base_interval"), "is required and must be > 0")
        base = base_value
        maximum = duration_field(back_off, "max_interval", None)
        if maximum is not None and maximum < base:
            raise ConfigError.at(
                join(bpath, "max_interval"), "must be greater than or equal to base_interval"
            )
    if maximum is None:
        maximum = 10 * base

    previous_hosts = False
    for i, predicate in enumerate(proto.retry_host_predicate):
        ppath = f"{path}.retry_host_predicate[{i}]"
        check_fields(predicate, ppath, {"name", "typed_config"})
        type_url = predicate.typed_config.type_url if predicate.HasField("typed_config") else ""
        if type_url == PREVIOUS_HOSTS_TYPE or (not type_url and predicate.name == PREVIOUS_HOSTS):
            previous_hosts = True  # PreviousHostsPredicate has no fields to check
            continue
        raise ConfigError.at(
            ppath,
            f"{type_url or predicate.name or 'an unnamed predicate'} is not supported "
            f"(supported: {PREVIOUS_HOSTS})",
        )

    per_try = duration_field(proto, "per_try_timeout", None)
    return RetryPolicy(
        retry_on=conditions,
        num_retries=uint_field(proto, "num_retries", 1),
        per_try_timeout=per_try or None,  # 0 disables, as unset does
        base_interval=base,
        max_interval=maximum,
        retriable_status_codes=frozenset(proto.retriable_status_codes),
        previous_hosts=previous_hosts,
        host_selection_max_attempts=max(1, proto.host_selection_retry_max_attempts),
    )


class RetryState:
    """One request's retry budget: asked after each failed attempt, it grants or refuses."""

    __slots__ = ("_backoff_step", "_remaining", "_rng", "exhausted", "policy", "retries_done")

    def __init__(self, policy: RetryPolicy, rng: random.Random) -> None:
        self.policy = policy
        self._rng = rng
        self._remaining = policy.num_retries
        self._backoff_step = 1
        self.retries_done = 0
        self.exhausted = False  # a condition matched with no retry left: flag URX

    def __repr__(self) -> str:
        return (
            f"<RetryState {self.retries_done} done, {self._remaining} left"
            f"{', exhausted' if self.exhausted else ''}>"
        )

    @property
    def remaining(self) -> int:
        return self._remaining

    def should_retry_status(
        self, status: int, *, grpc_status: int | None = None, ratelimited: bool = False
    ) -> bool:
        """A response arrived: retry it? Consumes a retry when the answer is yes.

        ``ratelimited``: the response carries ``x-envoy-ratelimited`` (never retried here).
        """
        if ratelimited or not self.policy.retries_status(status, grpc_status):
            return False
        return self._grant()

    def should_retry_outcome(self, outcome: Outcome) -> bool:
        """An attempt failed without a response: retry it? Consumes a retry when yes."""
        if not self.policy.retries_outcome(outcome):
            return False
        return self._grant()

    def _grant(self) -> bool:
        if self._remaining <= 0:
            self.exhausted = True
            return False
        self._remaining -= 1
        self.retries_done += 1
        return True

    def backoff(self) -> float:
        """Seconds to wait before the retry just granted (Envoy's jittered back-off)."""
        policy = self.policy
        span = ((1 << self._backoff_step) - 1) * policy.base_interval
        if span <= policy.max_interval:
            self._backoff_step += 1
        return min(self._rng.random() * span, policy.max_interval)
