"""The fault filter (``envoy.filters.http.fault``): delay or abort matching requests.

``compile_fault`` turns an ``HTTPFault`` into a frozen ``FaultPolicy``; ``decide`` rolls the
dice for one request and returns what to inject. The filter around it holds the request for
``delay`` (flag DI) and/or answers ``abort_status`` with body ``fault filter abort`` (flag
FI) -- when both fire, the abort comes after the delay.

Rules kept (``fault_filter.cc``, ``fault_config.cc``, ``fault.proto``):

* Gates, all of which must pass: ``upstream_cluster`` equals the route's cluster,
  ``downstream_nodes`` contains ``x-envoy-downstream-service-node``, every ``headers``
  matcher matches.
* ``percentage`` is a ``FractionalPercent``: a fault fires when ``randrange(denominator) <
  numerator``, so a numerator above the denominator means always and an unset percentage
  means never. Delay and abort are rolled independently. A zero delay is no delay.
* ``header_delay`` / ``header_abort``: the request chooses the fault with
  ``x-envoy-fault-delay-request`` (milliseconds) / ``x-envoy-fault-abort-request`` (a status
  in [200, 600)); an absent or unparsable value means no fault. The percentage may come from
  ``x-envoy-fault-{delay,abort}-request-percentage``, using the configured denominator and
  capped at the configured numerator.
* ``max_active_faults``: when that many faulted requests are in flight, no fault is injected
  (stat ``faults_overflow``); the caller counts the active ones.

Refused: ``grpc_status`` aborts, ``response_rate_limit``, runtime key overrides,
``filter_metadata``. ``x-envoy-fault-abort-grpc-request`` is not read (no gRPC aborts).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.type.v3 import percent_pb2

from meshlet.errors import ConfigError
from meshlet.proxy.fields import check_fields, duration_field, join
from meshlet.proxy.headers import RequestHead
from meshlet.proxy.matching import HeaderMatcher, compile_header_matcher

DELAY_HEADER = b"x-envoy-fault-delay-request"
DELAY_PERCENTAGE_HEADER = b"x-envoy-fault-delay-request-percentage"
ABORT_HEADER = b"x-envoy-fault-abort-request"
ABORT_PERCENTAGE_HEADER = b"x-envoy-fault-abort-request-percentage"
DOWNSTREAM_NODE_HEADER = b"x-envoy-downstream-service-node"
ABORT_BODY = b"fault filter abort"

_DENOMINATORS = {
    percent_pb2.FractionalPercent.HUNDRED: 100,
    percent_pb2.FractionalPercent.TEN_THOUSAND: 10_000,
    percent_pb2.FractionalPercent.MILLION: 1_000_000,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Fraction:
    """A compiled ``FractionalPercent``: fires when ``randrange(denominator) < numerator``."""

    numerator: int = 0
    denominator: int = 100

    def roll(self, rng: random.Random) -> bool:
        if self.numerator <= 0:
            return False
        if self.numerator >= self.denominator:
            return True
        return rng.randrange(self.denominator) < self.numerator

    def from_header(self, value: bytes | None) -> Fraction:
        """The percentage a request header asks for, capped at this one (Envoy's
        ``HeaderPercentageProvider``); this one when the header is absent or malformed."""
        number = _uint(value)
        if number is None:
            return self
        return Fraction(numerator=min(number, self.numerator), denominator=self.denominator)


NEVER = Fraction()


@dataclass(frozen=True, slots=True, kw_only=True)
class DelayFault:
    """``fixed`` seconds, or (``fixed`` None) the delay the request's header asks for."""

    fixed: float | None
    percentage: Fraction = NEVER


@dataclass(frozen=True, slots=True, kw_only=True)
class AbortFault:
    """``http_status``, or (``http_status`` None) the status the request's header asks for."""

    http_status: int | None
    percentage: Fraction = NEVER


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultPolicy:
    """A compiled ``HTTPFault``."""

    delay: DelayFault | None = None
    abort: AbortFault | None = None
    headers: tuple[HeaderMatcher, ...] = ()
    upstream_cluster: str | None = None
    downstream_nodes: frozenset[bytes] = frozenset()
    max_active_faults: int | None = None  # None: unlimited


@dataclass(frozen=True, slots=True)
class FaultDecision:
    """What to inject into one request. ``overflow``: a fault was due but refused by
    ``max_active_faults`` (count ``faults_overflow``)."""

    delay: float | None = None  # seconds
    abort_status: int | None = None
    overflow: bool = False

    @property
    def active(self) -> bool:
        return self.delay is not None or self.abort_status is not None


NO_FAULT = FaultDecision()
FAULT_OVERFLOW = FaultDecision(overflow=True)

_FAULT_FIELDS = frozenset(
    {
        "delay",
        "abort",
        "upstream_cluster",
        "headers",
        "downstream_nodes",
        "max_active_faults",
        # Only turns off per-downstream-cluster stats, which meshlet never emits.
        "disable_downstream_cluster_stats",
    }
)


def compile_fault(proto: fault_pb2.HTTPFault, path: str) -> FaultPolicy:
    """Compile an ``HTTPFault`` (filter config or per-route override); raises ``ConfigError``."""
    check_fields(proto, path, _FAULT_FIELDS)
    delay = None
    if proto.HasField("delay"):
        delay = _compile_delay(proto.delay, join(path, "delay"))
    abort = None
    if proto.HasField("abort"):
        abort = _compile_abort(proto.abort, join(path, "abort"))
    headers = tuple(
        compile_header_matcher(m, f"{path}.headers[{i}]") for i, m in enumerate(proto.headers)
    )
    max_active = proto.max_active_faults.value if proto.HasField("max_active_faults") else None
    return FaultPolicy(
        delay=delay,
        abort=abort,
        headers=headers,
        upstream_cluster=proto.upstream_cluster or None,
        downstream_nodes=frozenset(n.encode() for n in proto.downstream_nodes),
        max_active_faults=max_active,
    )


def _compile_percentage(proto: percent_pb2.FractionalPercent, path: str) -> Fraction:
    check_fields(proto, path, {"numerator", "denominator"})
    denominator = _DENOMINATORS.get(proto.denominator)
    if denominator is None:
        raise ConfigError.at(join(path, "denominator"), f"unknown value {proto.denominator}")
    return Fraction(numerator=proto.numerator, denominator=denominator)


def _compile_delay(proto: common_fault_pb2.FaultDelay, path: str) -> DelayFault:
    check_fields(proto, path, {"fixed_delay", "header_delay", "percentage"})
    percentage = NEVER
    if proto.HasField("percentage"):
        percentage = _compile_percentage(proto.percentage, join(path, "percentage"))
    kind = proto.WhichOneof("fault_delay_secifier")  # sic: the proto's spelling
    if kind == "header_delay":
        check_fields(proto.header_delay, join(path, "header_delay"), ())
        return DelayFault(fixed=None, percentage=percentage)
    if kind != "fixed_delay":
        raise ConfigError.at(path, "needs fixed_delay or header_delay")
    fixed = duration_field(proto, "fixed_delay", None)
    if fixed is None or fixed <= 0:
        raise ConfigError.at(join(path, "fixed_delay"), "must be greater than 0")
    return DelayFault(fixed=fixed, percentage=percentage)


def _compile_abort(proto: fault_pb2.FaultAbort, path: str) -> AbortFault:
    check_fields(proto, path, {"http_status", "header_abort", "percentage"})
    percentage = NEVER
    if proto.HasField("percentage"):
        percentage = _compile_percentage(proto.percentage, join(path, "percentage"))
    kind = proto.WhichOneof("error_type")
    if kind == "header_abort":
        check_fields(proto.header_abort, join(path, "header_abort"), ())
        return AbortFault(http_status=None, percentage=percentage)
    if kind != "http_status":
        raise ConfigError.at(path, "needs http_status or header_abort")
    if not 200 <= proto.http_status < 600:
        raise ConfigError.at(
            join(path, "http_status"), f"must be in [200, 600), got {proto.http_status}"
        )
    return AbortFault(http_status=proto.http_status, percentage=percentage)


def _uint(value: bytes | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    if value.startswith(b"+"):
        value = value[1:]
    if not value.isdigit() or len(value) > 19:
        return None
    return int(value)


def decide(
    policy: FaultPolicy,
    head: RequestHead,
    cluster: str,
    active_faults: int,
    rng: random.Random,
) -> FaultDecision:
    """Roll for one request. ``cluster`` is the route's cluster; ``active_faults`` counts the
    faulted requests in flight now (delayed, or being aborted) for ``max_active_faults``."""
    if policy.upstream_cluster is not None and cluster != policy.upstream_cluster:
        return NO_FAULT
    if policy.downstream_nodes and head.headers.get(DOWNSTREAM_NODE_HEADER) not in (
        policy.downstream_nodes
    ):
        return NO_FAULT
    for matcher in policy.headers:
        if not matcher.matches(head):
            return NO_FAULT

    delay: float | None = None
    fault = policy.delay
    if fault is not None:
        if fault.fixed is not None:
            seconds: float | None = fault.fixed
            percentage = fault.percentage
        else:
            ms = _uint(head.headers.get(DELAY_HEADER))
            seconds = None if ms is None else ms / 1000
            percentage = fault.percentage.from_header(head.headers.get(DELAY_PERCENTAGE_HEADER))
        if seconds and percentage.roll(rng):
            delay = seconds

    abort_status: int | None = None
    abort = policy.abort
    if abort is not None:
        if abort.http_status is not None:
            status: int | None = abort.http_status
            percentage = abort.percentage
        else:
            status = _uint(head.headers.get(ABORT_HEADER))
            if status is not None and not 200 <= status < 600:
                status = None
            percentage = abort.percentage.from_header(head.headers.get(ABORT_PERCENTAGE_HEADER))
        if status is not None and percentage.roll(rng):
            abort_status = status

    if delay is None and abort_status is None:
        return NO_FAULT
    if policy.max_active_faults is not None and active_faults >= policy.max_active_faults:
        return FAULT_OVERFLOW
    return FaultDecision(delay=delay, abort_status=abort_status)
