"""Retry policy: compilation, which failures are retried, the retry budget and back-off.

Envoy references: docs configuration/http/http_filters/router_filter.rst (x-envoy-retry-on,
x-envoy-max-retries, back-off), route_components.proto RetryPolicy, and
source/common/router/retry_state_impl.cc (wouldRetryFromHeaders, wouldRetryFromReset,
JitteredExponentialBackOffStrategy).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from hypothesis import given
from hypothesis import strategies as st

from meshlet.errors import ConfigError
from meshlet.proxy.retry import (
    NO_RETRY,
    Outcome,
    RetryPolicy,
    RetryState,
    compile_retry_policy,
)

RP = route_components_pb2.RetryPolicy
PATH = "virtual_hosts[0].routes[2].route.retry_policy"


def policy(**fields: object) -> RetryPolicy:
    return RetryPolicy(**fields)  # type: ignore[arg-type]


class MaxRng(random.Random):
    """An RNG whose random() is as large as it gets: shows the top of each back-off range."""

    def random(self) -> float:
        return 1.0 - 2**-53


# -- compile ----------------------------------------------------------------------------------


def test_defaults_are_envoys() -> None:
    # route_components.proto: num_retries 1; router_filter.rst: base 25 ms, max 10x base.
    p = compile_retry_policy(RP(retry_on="5xx"), PATH)
    assert p == RetryPolicy(retry_on=frozenset({"5xx"}))
    assert (p.num_retries, p.base_interval, p.max_interval) == (1, 0.025, 0.25)
    assert (p.per_try_timeout, p.previous_hosts, p.host_selection_max_attempts) == (None, False, 1)


def test_istios_default_retry_policy_compiles() -> None:
    # istio pilot route/retry DefaultPolicy(): 2 retries on connect-failure, refused-stream,
    # unavailable, cancelled, retriable-status-codes (503), previous_hosts, 5 selections.
    proto = RP(
        retry_on="connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        retriable_status_codes=[503],
        host_selection_retry_max_attempts=5,
    )
    proto.num_retries.value = 2
    predicate = proto.retry_host_predicate.add(name="envoy.retry_host_predicates.previous_hosts")
    predicate.typed_config.Pack(previous_hosts_pb2.PreviousHostsPredicate())
    p = compile_retry_policy(proto, PATH)
    assert p.retry_on == {
        "connect-failure",
        "refused-stream",
        "unavailable",
        "cancelled",
        "retriable-status-codes",
    }
    assert (p.num_retries, p.retriable_status_codes) == (2, frozenset({503}))
    assert (p.previous_hosts, p.host_selection_max_attempts) == (True, 5)


def test_retry_on_is_a_comma_list_with_spaces_allowed() -> None:
    p = compile_retry_policy(RP(retry_on=" 5xx , reset,,connect-failure "), PATH)
    assert p.retry_on == {"5xx", "reset", "connect-failure"}


def test_back_off_and_per_try_timeout_are_read() -> None:
    proto = RP(retry_on="5xx")
    proto.retry_back_off.base_interval.FromMilliseconds(100)
    proto.retry_back_off.max_interval.FromMilliseconds(400)
    proto.per_try_timeout.FromMilliseconds(1500)
    p = compile_retry_policy(proto, PATH)
    assert (p.base_interval, p.max_interval, p.per_try_timeout) == (0.1, 0.4, 1.5)
    proto.ClearField("retry_back_off")
    proto.retry_back_off.base_interval.FromMilliseconds(40)
    assert compile_retry_policy(proto, PATH).max_interval == pytest.approx(0.4)  # 10x base


def test_a_zero_per_try_timeout_means_none() -> None:
    proto = RP(retry_on="5xx")
    proto.per_try_timeout.SetInParent()
    assert compile_retry_policy(proto, PATH).per_try_timeout is None


def _bad_predicate(p: route_components_pb2.RetryPolicy) -> None:
    p.retry_host_predicate.add(name="envoy.retry_host_predicates.omit_canary_hosts")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (
            lambda p: setattr(p, "retry_on", "5xx,retriable-headers"),
            "retry_on: retriable-headers is not supported (supported: 5xx, gateway-error, reset, "
            "reset-before-request, connect-failure, retriable-4xx, refused-stream, "
            "retriable-status-codes, cancelled, deadline-exceeded, resource-exhausted, internal, "
            "unavailable)",
        ),
        (lambda p: p.retry_priority.SetInParent(), "retry_priority: is not supported by meshlet"),
        (lambda p: p.retriable_headers.add(), "retriable_headers: is not supported by meshlet"),
        (
            lambda p: p.per_try_idle_timeout.FromSeconds(1),
            "per_try_idle_timeout: is not supported by meshlet",
        ),
        (
            lambda p: p.retry_back_off.max_interval.FromSeconds(1),
            "retry_back_off.base_interval: is required and must be > 0",
        ),
        (
            lambda p: (
                p.retry_back_off.base_interval.FromSeconds(2),
                p.retry_back_off.max_interval.FromSeconds(1),
            ),
            "retry_back_off.max_interval: must be greater than or equal to base_interval",
        ),
        (
            _bad_predicate,
            "retry_host_predicate[0]: envoy.retry_host_predicates.omit_canary_hosts is not "
            "supported (supported: envoy.retry_host_predicates.previous_hosts)",
        ),
        (
            lambda p: p.retriable_status_codes.append(99),
            "retriable_status_codes: 99 is not an HTTP status code",
        ),
    ],
)
def test_unsupported_conditions_and_fields_are_refused_by_name(
    setup: Callable[[route_components_pb2.RetryPolicy], object], message: str
) -> None:
    proto = RP(retry_on="5xx")
    setup(proto)
    with pytest.raises(ConfigError) as e:
        compile_retry_policy(proto, PATH)
    assert str(e.value) == f"{PATH}.{message}"


# -- which failures are retried ---------------------------------------------------------------

# retry_state_impl.cc wouldRetryFromReset; router_filter.rst x-envoy-retry-on.
OUTCOME_TABLE = {
    #                          5xx    gw     reset  r-b-r  connect 4xx
    Outcome.CONNECT_FAILURE: (True, True, True, True, True, False),
    Outcome.RESET_BEFORE_REQUEST: (True, True, True, True, False, False),
    Outcome.RESET: (True, True, True, False, False, False),
    Outcome.PER_TRY_TIMEOUT: (True, True, True, False, False, False),
    Outcome.OVERFLOW: (False, False, False, False, False, False),
}
CONDITIONS = (
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "retriable-4xx",
)


@pytest.mark.parametrize("outcome", list(Outcome))
@pytest.mark.parametrize("condition", CONDITIONS)
def test_failures_without_a_response_are_retried_per_envoys_table(
    outcome: Outcome, condition: str
) -> None:
    state = RetryState(policy(retry_on=frozenset({condition})), random.Random(1))
    expected = OUTCOME_TABLE[outcome][CONDITIONS.index(condition)]
    assert state.should_retry_outcome(outcome) is expected


def test_overflow_is_never_retried() -> None:
    # router_filter.rst: circuit-breaker overflow is never retried.
    everything = frozenset(CONDITIONS) | {"refused-stream", "retriable-status-codes"}
    state = RetryState(policy(retry_on=everything, num_retries=5), random.Random(1))
    assert not state.should_retry_outcome(Outcome.OVERFLOW)
    assert not state.exhausted


@pytest.mark.parametrize(
    ("condition", "retried", "not_retried"),
    [
        ("5xx", (500, 501, 503, 599), (200, 404, 409, 499)),
        ("gateway-error", (502, 503, 504), (500, 501, 505, 409)),
        ("retriable-4xx", (409,), (400, 404, 429, 500)),
        ("reset", (), (500, 503)),
        ("connect-failure", (), (503,)),
    ],
)
def test_statuses_are_retried_per_condition(
    condition: str, retried: tuple[int, ...], not_retried: tuple[int, ...]
) -> None:
    p = policy(retry_on=frozenset({condition}))
    assert all(p.retries_status(s) for s in retried)
    assert not any(p.retries_status(s) for s in not_retried)


def test_retriable_status_codes_need_the_condition() -> None:
    # route_components.proto retriable_status_codes: used with retry_on retriable-status-codes.
    codes = frozenset({418, 503})
    assert policy(
        retry_on=frozenset({"retriable-status-codes"}), retriable_status_codes=codes
    ).retries_status(418)
    assert not policy(retry_on=frozenset({"5xx"}), retriable_status_codes=codes).retries_status(418)


def test_grpc_conditions_match_the_grpc_status() -> None:
    # router_filter.rst x-envoy-retry-grpc-on: unavailable is grpc-status 14, cancelled 1.
    p = policy(retry_on=frozenset({"unavailable", "cancelled"}))
    assert p.retries_status(200, grpc_status=14)
    assert p.retries_status(200, grpc_status=1)
    assert not p.retries_status(200, grpc_status=13)
    assert not p.retries_status(200)


def test_ratelimited_responses_are_never_retried() -> None:
    # router_filter.rst: x-envoy-ratelimited responses are retried only under
    # envoy-ratelimited (not supported), "regardless of other retry policies".
    state = RetryState(policy(retry_on=frozenset({"5xx"})), random.Random(1))
    assert not state.should_retry_status(503, ratelimited=True)


def test_no_retry_policy_retries_nothing() -> None:
    state = RetryState(NO_RETRY, random.Random(1))
    assert not state.should_retry_status(503)
    assert not state.should_retry_outcome(Outcome.CONNECT_FAILURE)
    assert not state.exhausted


# -- the budget -------------------------------------------------------------------------------


def test_each_granted_retry_consumes_one_and_exhaustion_is_recorded() -> None:
    # retry_state_impl.cc shouldRetry: retries_remaining_ == 0 => NoRetryLimitExceeded (URX).
    state = RetryState(policy(retry_on=frozenset({"5xx"}), num_retries=2), random.Random(1))
    assert state.should_retry_status(503)
    assert state.should_retry_outcome(Outcome.RESET)
    assert (state.retries_done, state.remaining, state.exhausted) == (2, 0, False)
    assert not state.should_retry_status(200)  # a success does not exhaust anything
    assert not state.exhausted
    assert not state.should_retry_status(500)
    assert state.exhausted
    assert state.retries_done == 2


def test_zero_retries_exhaust_on_the_first_retriable_failure() -> None:
    state = RetryState(policy(retry_on=frozenset({"5xx"}), num_retries=0), random.Random(1))
    assert not state.should_retry_status(503)
    assert state.exhausted


# -- back-off ---------------------------------------------------------------------------------


def test_back_off_ranges_grow_exponentially_and_are_capped() -> None:
    # router_filter.rst: retry N waits in [0, (2^N - 1) * 25 ms), capped at max_interval
    # (250 ms): 25, 75, 175, then 250 ms at most.
    state = RetryState(policy(retry_on=frozenset({"5xx"}), num_retries=10), MaxRng())
    tops = [state.backoff() for _ in range(6)]
    assert tops[:3] == pytest.approx([0.025, 0.075, 0.175])
    assert tops[3:] == [0.25, 0.25, 0.25]


@given(
    seed=st.integers(min_value=0),
    base_ms=st.integers(min_value=1, max_value=1000),
    factor=st.integers(min_value=1, max_value=50),
    retries=st.integers(1, 40),
)
def test_back_off_is_uniform_within_its_range(
    seed: int, base_ms: int, factor: int, retries: int
) -> None:
    base = base_ms / 1000
    p = policy(retry_on=frozenset({"5xx"}), base_interval=base, max_interval=base * factor)
    state = RetryState(p, random.Random(seed))
    for n in range(1, retries + 1):
        wait = state.backoff()
        assert 0 <= wait <= p.max_interval
        assert wait < (2**n - 1) * base
