"""The fault filter: compilation, gates, percentages, header-driven faults, max_active_faults.

Envoy references: docs configuration/http/http_filters/fault_filter.rst, fault.proto (http and
common), type/v3/percent.proto, and source/extensions/filters/http/fault/fault_filter.cc,
source/extensions/filters/common/fault/fault_config.cc.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.type.v3 import percent_pb2
from hypothesis import given
from hypothesis import strategies as st

from meshlet.errors import ConfigError
from meshlet.proxy.filters.fault import (
    FAULT_OVERFLOW,
    NO_FAULT,
    FaultDecision,
    Fraction,
    compile_fault,
    decide,
)
from meshlet.proxy.headers import Headers, RequestHead

FP = percent_pb2.FractionalPercent
PATH = "http_filters[0].typed_config"


def head(*headers: tuple[bytes, bytes]) -> RequestHead:
    return RequestHead(
        method=b"GET", path=b"/", authority=b"ratings", headers=Headers(list(headers))
    )


def fault(
    *,
    delay_ms: int | None = None,
    delay_pct: tuple[int, int] | None = None,
    abort: int | None = None,
    abort_pct: tuple[int, int] | None = None,
) -> fault_pb2.HTTPFault:
    proto = fault_pb2.HTTPFault()
    if delay_ms is not None:
        proto.delay.fixed_delay.FromMilliseconds(delay_ms)
        if delay_pct is not None:
            proto.delay.percentage.numerator, proto.delay.percentage.denominator = delay_pct
    if abort is not None:
        proto.abort.http_status = abort
        if abort_pct is not None:
            proto.abort.percentage.numerator, proto.abort.percentage.denominator = abort_pct
    return proto


def always(rng_seed: int = 1) -> random.Random:
    return random.Random(rng_seed)


# -- compile ----------------------------------------------------------------------------------


def test_istio_style_fault_compiles() -> None:
    # Istio TranslateFault: fixed delay and http abort, FractionalPercent per MILLION.
    policy = compile_fault(
        fault(
            delay_ms=7000,
            delay_pct=(1_000_000, FP.MILLION),
            abort=500,
            abort_pct=(500_000, FP.MILLION),
        ),
        PATH,
    )
    assert policy.delay is not None and policy.delay.fixed == 7.0
    assert policy.delay.percentage == Fraction(numerator=1_000_000, denominator=1_000_000)
    assert policy.abort is not None and policy.abort.http_status == 500
    assert policy.abort.percentage == Fraction(numerator=500_000, denominator=1_000_000)
    assert policy.max_active_faults is None and policy.upstream_cluster is None


def _grpc_abort(p: fault_pb2.HTTPFault) -> None:
    p.abort.grpc_status = 14


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (_grpc_abort, "abort.grpc_status: is not supported by meshlet"),
        (
            lambda p: p.response_rate_limit.SetInParent(),
            "response_rate_limit: is not supported by meshlet",
        ),
        (
            lambda p: setattr(p, "delay_percent_runtime", "x"),
            "delay_percent_runtime: is not supported by meshlet",
        ),
        (
            lambda p: setattr(p, "abort_http_status_runtime", "x"),
            "abort_http_status_runtime: is not supported by meshlet",
        ),
        (
            lambda p: setattr(p.abort, "http_status", 600),
            "abort.http_status: must be in [200, 600), got 600",
        ),
        (
            lambda p: setattr(p.abort, "http_status", 199),
            "abort.http_status: must be in [200, 600), got 199",
        ),
        (lambda p: p.delay.fixed_delay.SetInParent(), "delay.fixed_delay: must be greater than 0"),
        (lambda p: p.delay.percentage.SetInParent(), "delay: needs fixed_delay or header_delay"),
        (lambda p: p.abort.percentage.SetInParent(), "abort: needs http_status or header_abort"),
        (
            lambda p: p.headers.add(name="x", safe_regex_match={"regex": "("}),
            "headers[0].safe_regex_match",
        ),  # message wording is matching.py's
    ],
)
def test_unsupported_and_invalid_fields_are_refused_by_field_path(
    setup: Callable[[fault_pb2.HTTPFault], object], message: str
) -> None:
    proto = fault_pb2.HTTPFault()
    setup(proto)
    with pytest.raises(ConfigError) as e:
        compile_fault(proto, PATH)
    assert str(e.value).startswith(f"{PATH}.{message}")


# -- percentages ------------------------------------------------------------------------------


def test_unset_percentage_never_injects() -> None:
    # fault.proto / fault_filter.rst: an unset percentage is numerator 0 -- never.
    policy = compile_fault(fault(delay_ms=100, abort=503), PATH)
    rng = random.Random(1)
    assert all(decide(policy, head(), "c", 0, rng) is NO_FAULT for _ in range(200))


def test_numerator_above_denominator_always_injects() -> None:
    # percent.proto FractionalPercent: values above the denominator cap at 100 %.
    policy = compile_fault(fault(abort=503, abort_pct=(150, FP.HUNDRED)), PATH)
    rng = random.Random(1)
    assert all(decide(policy, head(), "c", 0, rng).abort_status == 503 for _ in range(200))


@given(
    numerator=st.integers(min_value=1, max_value=2_000_000),
    denominator=st.sampled_from([100, 10_000, 1_000_000]),
    seed=st.integers(min_value=0),
)
def test_a_fraction_fires_when_a_draw_below_the_denominator_is_below_the_numerator(
    numerator: int, denominator: int, seed: int
) -> None:
    # runtime featureEnabled(FractionalPercent): random % denominator < numerator.
    fraction = Fraction(numerator=numerator, denominator=denominator)
    expected = numerator >= denominator or random.Random(seed).randrange(denominator) < numerator
    assert fraction.roll(random.Random(seed)) is expected


def test_delay_and_abort_are_rolled_independently() -> None:
    # fault_filter.rst: abort and delay percentages apply independently.
    policy = compile_fault(
        fault(delay_ms=50, delay_pct=(50, FP.HUNDRED), abort=503, abort_pct=(20, FP.HUNDRED)), PATH
    )
    rng = random.Random(42)
    n = 20_000
    decisions = [decide(policy, head(), "c", 0, rng) for _ in range(n)]
    delayed = sum(d.delay is not None for d in decisions) / n
    aborted = sum(d.abort_status is not None for d in decisions) / n
    both = sum(d.delay is not None and d.abort_status is not None for d in decisions) / n
    assert 0.48 < delayed < 0.52
    assert 0.18 < aborted < 0.22
    assert 0.08 < both < 0.12
    assert all(d.delay in (None, 0.05) for d in decisions)


def test_ten_thousand_denominator_is_honoured() -> None:
    policy = compile_fault(fault(abort=500, abort_pct=(2500, FP.TEN_THOUSAND)), PATH)
    rng = random.Random(9)
    share = (
        sum(decide(policy, head(), "c", 0, rng).abort_status == 500 for _ in range(20_000)) / 20_000
    )
    assert 0.23 < share < 0.27


# -- gates ------------------------------------------------------------------------------------


def test_header_matchers_gate_the_fault() -> None:
    # fault.proto headers: "the filter will check the request's headers against all the
    # specified headers in the filter config" (all must match).
    proto = fault(abort=418, abort_pct=(100, FP.HUNDRED))
    proto.headers.add(name="end-user", exact_match="jason")
    proto.headers.add(name="x-canary", present_match=True)
    policy = compile_fault(proto, PATH)
    rng = always()
    both = head((b"end-user", b"jason"), (b"x-canary", b"1"))
    assert decide(policy, both, "c", 0, rng) == FaultDecision(abort_status=418)
    assert decide(policy, head((b"end-user", b"jason")), "c", 0, rng) is NO_FAULT
    assert decide(policy, head((b"end-user", b"bob"), (b"x-canary", b"1")), "c", 0, rng) is NO_FAULT


def test_upstream_cluster_gates_the_fault() -> None:
    # fault.proto upstream_cluster: only requests routed to that cluster.
    proto = fault(abort=503, abort_pct=(100, FP.HUNDRED))
    proto.upstream_cluster = "outbound|9080||ratings"
    policy = compile_fault(proto, PATH)
    assert decide(policy, head(), "outbound|9080||ratings", 0, always()).abort_status == 503
    assert decide(policy, head(), "outbound|9080||reviews", 0, always()) is NO_FAULT


def test_downstream_nodes_gate_the_fault() -> None:
    # fault.proto downstream_nodes: x-envoy-downstream-service-node must be listed.
    proto = fault(abort=503, abort_pct=(100, FP.HUNDRED))
    proto.downstream_nodes.append("productpage")
    policy = compile_fault(proto, PATH)
    node = (b"x-envoy-downstream-service-node", b"productpage")
    assert decide(policy, head(node), "c", 0, always()).abort_status == 503
    assert decide(policy, head(), "c", 0, always()) is NO_FAULT


def test_max_active_faults_refuses_new_faults_at_the_limit() -> None:
    # fault.proto max_active_faults; fault_filter.rst stat faults_overflow.
    proto = fault(delay_ms=10, delay_pct=(100, FP.HUNDRED))
    proto.max_active_faults.value = 2
    policy = compile_fault(proto, PATH)
    assert decide(policy, head(), "c", 1, always()).delay == 0.01
    overflow = decide(policy, head(), "c", 2, always())
    assert overflow is FAULT_OVERFLOW
    assert overflow.overflow and not overflow.active


def test_no_fault_when_nothing_fires_even_at_the_limit() -> None:
    proto = fault(delay_ms=10)  # 0 %
    proto.max_active_faults.value = 0
    assert decide(compile_fault(proto, PATH), head(), "c", 5, always()) is NO_FAULT


# -- header-driven faults ---------------------------------------------------------------------


def header_fault() -> fault_pb2.HTTPFault:
    proto = fault_pb2.HTTPFault()
    proto.delay.header_delay.SetInParent()
    proto.delay.percentage.numerator = 100
    proto.abort.header_abort.SetInParent()
    proto.abort.percentage.numerator = 100
    return proto


def test_header_delay_and_abort_come_from_the_request() -> None:
    # fault_filter.rst "Controlling fault injection via HTTP headers".
    policy = compile_fault(header_fault(), PATH)
    request = head(
        (b"x-envoy-fault-delay-request", b"250"), (b"x-envoy-fault-abort-request", b"429")
    )
    assert decide(policy, request, "c", 0, always()) == FaultDecision(delay=0.25, abort_status=429)


def test_header_faults_need_a_header() -> None:
    assert decide(compile_fault(header_fault(), PATH), head(), "c", 0, always()) is NO_FAULT


@pytest.mark.parametrize(
    "headers",
    [
        [(b"x-envoy-fault-abort-request", b"700")],
        [(b"x-envoy-fault-abort-request", b"199")],
        [(b"x-envoy-fault-abort-request", b"abc")],
        [(b"x-envoy-fault-delay-request", b"-5")],
        [(b"x-envoy-fault-delay-request", b"0")],
    ],
)
def test_malformed_or_out_of_range_fault_headers_inject_nothing(
    headers: list[tuple[bytes, bytes]],
) -> None:
    # fault_config.cc: abort status must be in [200, 600); a parse failure means no fault;
    # a zero delay is no delay (fault_filter.cc delayDuration).
    assert decide(compile_fault(header_fault(), PATH), head(*headers), "c", 0, always()) is NO_FAULT


def test_header_percentages_are_capped_at_the_configured_percentage() -> None:
    # fault_filter.rst: x-envoy-fault-abort-request-percentage uses the configured
    # denominator and may not exceed the configured numerator.
    proto = header_fault()
    proto.abort.percentage.numerator = 10
    policy = compile_fault(proto, PATH)
    rng = random.Random(3)
    asks_all = head(
        (b"x-envoy-fault-abort-request", b"503"),
        (b"x-envoy-fault-abort-request-percentage", b"100"),
    )
    share = sum(decide(policy, asks_all, "c", 0, rng).abort_status == 503 for _ in range(10_000))
    assert 900 < share < 1100  # capped at 10 %
    asks_none = head(
        (b"x-envoy-fault-abort-request", b"503"), (b"x-envoy-fault-abort-request-percentage", b"0")
    )
    assert all(decide(policy, asks_none, "c", 0, rng) is NO_FAULT for _ in range(100))


def test_fixed_faults_ignore_fault_headers() -> None:
    # Header control only works when the header_* variant is configured.
    policy = compile_fault(fault(abort=500, abort_pct=(100, FP.HUNDRED)), PATH)
    request = head((b"x-envoy-fault-abort-request", b"418"))
    assert decide(policy, request, "c", 0, always()).abort_status == 500
