"""The telemetry flags of `meshlet up` and `meshlet demo` (CONTRACT §4): the dashboard on
20001 and the OTLP receiver on 4318 unless told otherwise (0: off), and Istio's 1 % trace
sampling for `up` where the demo traces every request."""

from __future__ import annotations

from meshlet.cli.main import build_parser


def test_up_defaults_to_istios_one_percent_and_the_standard_ports() -> None:
    args = build_parser().parse_args(["up", "-f", "x.yaml"])
    assert (args.dashboard_port, args.otlp_port, args.trace_sampling) == (20001, 4318, 1.0)
    assert args.prometheus == "" and args.scrape_interval == 5.0


def test_demo_traces_every_request() -> None:
    args = build_parser().parse_args(["demo"])
    assert args.trace_sampling == 100.0
    assert (args.dashboard_port, args.otlp_port) == (20001, 4318)


def test_ports_zero_turn_the_dashboard_and_the_receiver_off() -> None:
    args = build_parser().parse_args(
        ["up", "-f", "x.yaml", "--dashboard-port", "0", "--otlp-port", "0",
         "--prometheus", "http://127.0.0.1:9090", "--trace-sampling", "2.5"]
    )  # fmt: skip
    assert (args.dashboard_port, args.otlp_port) == (0, 0)
    assert args.prometheus == "http://127.0.0.1:9090" and args.trace_sampling == 2.5
