"""Access logs compiled from Envoy AccessLog protos: formats, filters, sinks, refusals."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import base_pb2, substitution_format_string_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from google.protobuf import any_pb2, json_format, struct_pb2
from hypothesis import given
from hypothesis import strategies as st

from meshlet.errors import ConfigError
from meshlet.proxy.headers import Headers, RequestHead
from meshlet.proxy.stream_info import Flag, StreamInfo
from meshlet.proxy.telemetry.access_log import (
    DEFAULT_FORMAT,
    FLUSH_BYTES,
    AccessLogger,
    AccessLogManager,
    LogSink,
    TextFormatter,
    compile_access_logs,
)

SFS = substitution_format_string_pb2.SubstitutionFormatString
START = 1795647303.123456  # 2026-11-25T22:55:03.123456Z
FIELD = "listeners[0].filter_chains[0].filters[0].typed_config.access_log"


def make_info(**overrides: Any) -> StreamInfo:
    info = StreamInfo(
        start=100.0,
        start_wall=START,
        downstream_remote="10.0.0.1:40000",
        downstream_local="10.0.0.2:15006",
    )
    info.end = 100.0421
    info.request = RequestHead(
        method=b"GET",
        path=b"/productpage?u=1",
        authority=b"productpage:9080",
        headers=Headers(
            [
                (b"user-agent", b"curl/8.5"),
                (b"x-request-id", b"5f2c"),
                (b"x-multi", b"one"),
                (b"x-multi", b"two"),
            ]
        ),
    )
    info.response_headers = Headers([(b"x-envoy-upstream-service-time", b"40")])
    info.response_code = 200
    info.response_code_details = "via_upstream"
    info.bytes_received = 12
    info.bytes_sent = 1234
    info.upstream_host = "10.1.0.5:9080"
    info.upstream_cluster = "outbound|9080||productpage.default.svc.cluster.local"
    info.route_name = "default"
    for key, value in overrides.items():
        setattr(info, key, value)
    return info


@pytest.fixture
def manager() -> Iterator[AccessLogManager]:
    m = AccessLogManager()
    yield m
    m.close()


def packed(msg: Any) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def text_format(fmt: str, *, omit_empty_values: bool = False) -> Any:
    return SFS(
        text_format_source=base_pb2.DataSource(inline_string=fmt),
        omit_empty_values=omit_empty_values,
    )


def json_log_format(mapping: dict[str, Any], *, omit_empty_values: bool = False) -> Any:
    struct = struct_pb2.Struct()
    json_format.ParseDict(mapping, struct)
    return SFS(json_format=struct, omit_empty_values=omit_empty_values)


def file_log(
    path: Path | str, log_format: Any = None, log_filter: Any = None
) -> accesslog_pb2.AccessLog:
    config = file_pb2.FileAccessLog(path=str(path))
    if log_format is not None:
        config.log_format.CopyFrom(log_format)
    proto = accesslog_pb2.AccessLog(name="envoy.access_loggers.file", typed_config=packed(config))
    if log_filter is not None:
        proto.filter.CopyFrom(log_filter)
    return proto


def one_logger(manager: AccessLogManager, proto: accesslog_pb2.AccessLog) -> AccessLogger:
    (logger,) = compile_access_logs([proto], FIELD, manager=manager)
    return logger


def render(fmt: str, info: StreamInfo | None = None, *, omit: bool = False) -> str:
    formatter = TextFormatter(fmt, "fmt", omit_empty_values=omit)
    return formatter.format(info or make_info()).decode()


def render_json(
    manager: AccessLogManager, tmp_path: Path, mapping: dict[str, Any], **kw: Any
) -> str:
    logger = one_logger(manager, file_log(tmp_path / "j.log", json_log_format(mapping, **kw)))
    logger.log(make_info())
    logger.flush()
    return (tmp_path / "j.log").read_text()


# -- text formats ------------------------------------------------------------------------------


def test_no_log_format_writes_envoys_default_line(manager: AccessLogManager, tmp_path: Path):
    logger = one_logger(manager, file_log(tmp_path / "a.log"))
    logger.log(make_info())
    logger.flush()
    assert (tmp_path / "a.log").read_text() == (
        '[2026-11-25T22:55:03.123Z] "GET /productpage?u=1 HTTP/1.1" 200 - 12 1234 42 40 '
        '"-" "curl/8.5" "5f2c" "productpage:9080" "10.1.0.5:9080"\n'
    )


def test_default_format_renders_dash_for_a_local_reply_without_upstream():
    info = make_info(
        response_headers=None,
        upstream_host="",
        upstream_cluster="",
        response_code=404,
        bytes_received=0,
        bytes_sent=0,
    )
    info.request = RequestHead(method=b"GET", path=b"/x", authority=b"nohost", headers=Headers())
    info.add_flag(Flag.NO_ROUTE)
    assert render(DEFAULT_FORMAT, info) == (
        '[2026-11-25T22:55:03.123Z] "GET /x HTTP/1.1" 404 NR 0 0 42 - "-" "-" "-" "nohost" "-"\n'
    )


def test_alternative_header_is_used_only_when_the_first_is_absent():
    fmt = "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"
    assert render(fmt) == "/productpage?u=1"
    info = make_info()
    assert info.request is not None
    info.request.headers.add(b"x-envoy-original-path", b"/original")
    assert render(fmt, info) == "/original"


def test_header_names_are_case_insensitive_and_repeated_headers_give_the_first():
    fmt = "%REQ(User-Agent)% %REQ(x-MULTI)% %REQUEST_HEADER(:method)%"
    assert render(fmt) == "curl/8.5 one GET"


def test_header_value_is_truncated_to_the_max_length():
    assert render("%REQ(USER-AGENT):4%|%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME):1%") == "curl|4"


def test_req_without_query_strips_the_query_string():
    assert render("%REQ_WITHOUT_QUERY(:PATH)%") == "/productpage"


def test_response_header_and_status_pseudo_header():
    assert render("%RESP(:STATUS)% %RESPONSE_HEADER(x-nope)%") == "200 -"


def test_double_percent_is_a_literal_percent():
    assert render("100%% of %RESPONSE_CODE%%%") == "100% of 200%"


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_literal_text_round_trips_when_percent_is_escaped(text: str):
    assert TextFormatter(text.replace("%", "%%"), "f").format_str(make_info()) == text


def test_omit_empty_values_renders_missing_values_as_empty():
    info = make_info(upstream_host="")
    assert render("[%REQ(X-NOPE)%][%UPSTREAM_HOST%]", info, omit=True) == "[][]"


def test_stream_info_operators():
    fmt = (
        "%PROTOCOL% %RESPONSE_CODE_DETAILS% %UPSTREAM_CLUSTER% %ROUTE_NAME% %BYTES_RECEIVED% "
        "%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% "
        "%DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_PORT% %REQUESTED_SERVER_NAME%"
    )
    assert render(fmt) == (
        "HTTP/1.1 via_upstream outbound|9080||productpage.default.svc.cluster.local default 12 "
        "10.0.0.1:40000 10.0.0.1 10.0.0.2:15006 15006 -"
    )


def test_ipv6_address_without_port_has_no_brackets():
    info = make_info(downstream_remote="[::1]:5000")
    assert render("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_REMOTE_PORT%", info) == (
        "::1 5000"
    )


def test_duration_is_absent_until_the_request_ends():
    assert render("%DURATION%", make_info(end=None)) == "-"


def test_response_code_zero_is_logged_when_nothing_was_sent():
    assert render("%RESPONSE_CODE% %RESPONSE_FLAGS%", make_info(response_code=0)) == "0 -"


def test_flags_join_with_commas():
    info = make_info()
    info.add_flag(Flag.UPSTREAM_RETRY_LIMIT_EXCEEDED)
    info.add_flag(Flag.UPSTREAM_CONNECTION_FAILURE)
    assert render("%RESPONSE_FLAGS%", info) == "URX,UF"


def test_hostname_operator_is_the_machine_name():
    import socket

    assert render("%HOSTNAME%") == socket.gethostname()


def test_invalid_utf8_header_bytes_are_logged_unchanged_in_text():
    info = make_info()
    assert info.request is not None
    info.request.headers.set(b"user-agent", b"bad\xff\xfe")
    assert TextFormatter("%REQ(USER-AGENT)%", "f").format(info) == b"bad\xff\xfe"


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("%START_TIME%", "2026-11-25T22:55:03.123Z"),
        ("%START_TIME()%", "2026-11-25T22:55:03.123Z"),
        ("%START_TIME(%s.%3f)%", "1795647303.123"),
        ("%START_TIME(%s)%", "1795647303"),
        ("%START_TIME(%Y/%m/%d %H:%M:%E6S)%", "2026/11/25 22:55:03.123456"),
        ("%START_TIME(%f)%", "123456000"),
        ("%START_TIME(%H%%%M)%", "22%55"),
    ],
)
def test_start_time_formats(fmt: str, expected: str):
    assert render(fmt) == expected


def test_start_time_cache_follows_the_second():
    formatter = TextFormatter("%START_TIME%", "f")
    assert formatter.format_str(make_info()) == "2026-11-25T22:55:03.123Z"
    later = make_info(start_wall=START + 61.5)
    assert formatter.format_str(later) == "2026-11-25T22:56:04.623Z"


@pytest.mark.parametrize(
    ("fmt", "complaint"),
    [
        ("%NOPE%", "%NOPE%"),
        ("%UPSTREAM_SERVICE_TIME%", "%UPSTREAM_SERVICE_TIME%"),
        ("%PROTOCOL(x)%", "does not take an argument"),
        ("%PROTOCOL%:3", None),  # ":3" after the closing % is plain text
        ("%DURATION:3%", "does not take a length"),
        ("%REQ%", "needs a header name"),
        ("%REQ(A?B?C)%", "two as X?Y"),
        ("%REQ(X-Ü)%", "must name a header"),
        ("%REQ(A B)%", "must name a header"),
        ("50% off", "no valid command operator at position 2"),
        ("%lower%", "no valid command operator"),
    ],
)
def test_bad_operators_are_config_errors_naming_the_field(
    manager: AccessLogManager, tmp_path: Path, fmt: str, complaint: str | None
):
    proto = file_log(tmp_path / "a.log", text_format(fmt))
    if complaint is None:
        one_logger(manager, proto)
        return
    with pytest.raises(ConfigError) as e:
        one_logger(manager, proto)
    message = str(e.value)
    assert f"{FIELD}[0].typed_config.log_format.text_format_source.inline_string" in message
    assert complaint in message


# -- JSON formats ------------------------------------------------------------------------------


def test_json_format_keeps_types_and_renders_missing_values_as_null(
    manager: AccessLogManager, tmp_path: Path
):
    line = render_json(
        manager,
        tmp_path,
        {
            "code": "%RESPONSE_CODE%",
            "duration": "%DURATION%",
            "ua": "%REQ(USER-AGENT)%",
            "missing": "%REQ(X-NOPE)%",
            "mixed": "%REQ(:METHOD)% %REQ(X-NOPE)%",
            "literal": "plain",
            "number": 7,
            "nested": {"host": "%UPSTREAM_HOST%", "list": ["%BYTES_SENT%", "x"]},
        },
    )
    assert line.endswith("}\n") and line.count("\n") == 1
    assert json.loads(line) == {
        "code": 200,
        "duration": 42,
        "ua": "curl/8.5",
        "missing": None,
        "mixed": "GET -",
        "literal": "plain",
        "number": 7,
        "nested": {"host": "10.1.0.5:9080", "list": [1234, "x"]},
    }
    assert list(json.loads(line)) == sorted(json.loads(line))  # keys sorted, compact
    assert ": " not in line


def test_json_omit_empty_values_drops_missing_keys(manager: AccessLogManager, tmp_path: Path):
    mapping = {"ua": "%REQ(USER-AGENT)%", "missing": "%REQ(X-NOPE)%", "mixed": "a%REQ(X-NOPE)%b"}
    line = render_json(manager, tmp_path, mapping, omit_empty_values=True)
    assert json.loads(line) == {"ua": "curl/8.5", "mixed": "ab"}


def test_json_bool_values_are_refused_naming_the_key(manager: AccessLogManager, tmp_path: Path):
    proto = file_log(tmp_path / "a.log", json_log_format({"outer": {"flag": True}}))
    with pytest.raises(ConfigError, match=r"log_format\.json_format\.outer\.flag: bool_value"):
        one_logger(manager, proto)


def test_unknown_operator_in_json_names_the_key(manager: AccessLogManager, tmp_path: Path):
    proto = file_log(tmp_path / "a.log", json_log_format({"k": "%BOGUS%"}))
    with pytest.raises(ConfigError, match=r"json_format\.k: command operator %BOGUS%"):
        one_logger(manager, proto)


# -- filters -----------------------------------------------------------------------------------


def status_filter(op: int, value: int) -> accesslog_pb2.AccessLogFilter:
    return accesslog_pb2.AccessLogFilter(
        status_code_filter=accesslog_pb2.StatusCodeFilter(
            comparison=accesslog_pb2.ComparisonFilter(
                op=op, value=base_pb2.RuntimeUInt32(default_value=value, runtime_key="k")
            )
        )
    )


def flag_filter(*flags: str) -> accesslog_pb2.AccessLogFilter:
    return accesslog_pb2.AccessLogFilter(
        response_flag_filter=accesslog_pb2.ResponseFlagFilter(flags=list(flags))
    )


def logged_codes(
    manager: AccessLogManager, tmp_path: Path, log_filter: Any, infos: list[StreamInfo]
) -> list[str]:
    path = tmp_path / f"f{len(list(tmp_path.iterdir()))}.log"
    logger = one_logger(manager, file_log(path, text_format("%RESPONSE_CODE%\n"), log_filter))
    for info in infos:
        logger.log(info)
    logger.flush()
    return path.read_text().split()


def test_status_code_filter_logs_only_matching_responses(manager: AccessLogManager, tmp_path: Path):
    infos = [make_info(response_code=c) for c in (200, 404, 500, 503)]
    ge500 = status_filter(accesslog_pb2.ComparisonFilter.GE, 500)
    assert logged_codes(manager, tmp_path, ge500, infos) == ["500", "503"]


def test_response_flag_filter_matches_listed_flags_or_any_flag(
    manager: AccessLogManager, tmp_path: Path
):
    plain = make_info(response_code=200)
    uh = make_info(response_code=503)
    uh.add_flag(Flag.NO_HEALTHY_UPSTREAM)
    nr = make_info(response_code=404)
    nr.add_flag(Flag.NO_ROUTE)
    assert logged_codes(manager, tmp_path, flag_filter("UH"), [plain, uh, nr]) == ["503"]
    assert logged_codes(manager, tmp_path, flag_filter(), [plain, uh, nr]) == ["503", "404"]


def test_and_or_filters_combine(manager: AccessLogManager, tmp_path: Path):
    eq404 = status_filter(accesslog_pb2.ComparisonFilter.EQ, 404)
    ge500 = status_filter(accesslog_pb2.ComparisonFilter.GE, 500)
    either = accesslog_pb2.AccessLogFilter(or_filter=accesslog_pb2.OrFilter(filters=[eq404, ge500]))
    infos = [make_info(response_code=c) for c in (200, 404, 502)]
    assert logged_codes(manager, tmp_path, either, infos) == ["404", "502"]


def test_duration_filter_compares_milliseconds(manager: AccessLogManager, tmp_path: Path):
    slow = accesslog_pb2.AccessLogFilter(
        duration_filter=accesslog_pb2.DurationFilter(
            comparison=accesslog_pb2.ComparisonFilter(
                op=accesslog_pb2.ComparisonFilter.GE,
                value=base_pb2.RuntimeUInt32(default_value=100, runtime_key="k"),
            )
        )
    )
    infos = [make_info(response_code=201), make_info(response_code=202, end=100.5)]
    assert logged_codes(manager, tmp_path, slow, infos) == ["202"]


@pytest.mark.parametrize(
    ("log_filter", "where"),
    [
        (
            accesslog_pb2.AccessLogFilter(
                not_health_check_filter=accesslog_pb2.NotHealthCheckFilter()
            ),
            "filter.not_health_check_filter: is not supported",
        ),
        (
            accesslog_pb2.AccessLogFilter(header_filter=accesslog_pb2.HeaderFilter()),
            "filter.header_filter.header.name: must not be empty",
        ),
        (flag_filter("UH", "XX"), "filter.response_flag_filter.flags[1]: unknown response flag"),
    ],
)
def test_unsupported_filters_are_refused_by_field(
    manager: AccessLogManager, tmp_path: Path, log_filter: Any, where: str
):
    with pytest.raises(ConfigError) as e:
        one_logger(manager, file_log(tmp_path / "a.log", log_filter=log_filter))
    assert f"{FIELD}[0].{where}" in str(e.value)


# -- sinks and typed configs -------------------------------------------------------------------


def test_file_log_is_buffered_until_flush(manager: AccessLogManager, tmp_path: Path):
    path = tmp_path / "buffered.log"
    logger = one_logger(manager, file_log(path, text_format("%RESPONSE_CODE%\n")))
    assert path.exists() and path.read_text() == ""  # created at compile time
    logger.log(make_info())
    logger.log(make_info(response_code=503))
    assert path.read_text() == ""
    logger.flush()
    assert path.read_text() == "200\n503\n"


def test_file_log_appends_to_existing_content(manager: AccessLogManager, tmp_path: Path):
    path = tmp_path / "existing.log"
    path.write_text("earlier\n")
    logger = one_logger(manager, file_log(path, text_format("%RESPONSE_CODE%\n")))
    logger.log(make_info())
    manager.flush()
    assert path.read_text() == "earlier\n200\n"


def test_buffer_is_written_once_it_passes_64_kib(manager: AccessLogManager, tmp_path: Path):
    path = tmp_path / "big.log"
    logger = one_logger(manager, file_log(path, text_format("%REQ(X-PAD)%\n")))
    info = make_info()
    assert info.request is not None
    info.request.headers.add(b"x-pad", b"p" * 1023)  # 1 KiB per line
    for _ in range(FLUSH_BYTES // 1024 - 1):
        logger.log(info)
    assert path.stat().st_size == 0
    logger.log(info)
    assert path.stat().st_size == FLUSH_BYTES
    assert logger.sink.buffered == 0


def test_loggers_of_one_path_share_one_sink(manager: AccessLogManager, tmp_path: Path):
    path = tmp_path / "shared.log"
    first, second = compile_access_logs(
        [file_log(path, text_format("a\n")), file_log(path, text_format("b\n"))],
        FIELD,
        manager=manager,
    )
    assert first.sink is second.sink
    first.log(make_info())
    second.log(make_info())
    first.flush()
    assert path.read_text() == "a\nb\n"


def test_unwritable_path_is_a_config_error_naming_the_field(
    manager: AccessLogManager, tmp_path: Path
):
    with pytest.raises(ConfigError) as e:
        one_logger(manager, file_log(tmp_path / "no-such-dir" / "a.log"))
    assert f"{FIELD}[0].typed_config.path: cannot open" in str(e.value)


def test_stdout_logger_writes_to_the_process_stdout_on_flush(
    manager: AccessLogManager, capsys: pytest.CaptureFixture[str]
):
    config = stream_pb2.StdoutAccessLog(log_format=text_format("%RESPONSE_CODE% stdout\n"))
    logger = one_logger(manager, accesslog_pb2.AccessLog(typed_config=packed(config)))
    logger.log(make_info())
    assert capsys.readouterr().out == ""
    logger.flush()
    assert capsys.readouterr().out == "200 stdout\n"


def test_file_log_to_dev_stderr_goes_to_the_process_stderr(
    manager: AccessLogManager, capsys: pytest.CaptureFixture[str]
):
    logger = one_logger(manager, file_log("/dev/stderr", text_format("%RESPONSE_CODE%\n")))
    logger.log(make_info())
    logger.flush()
    assert capsys.readouterr().err == "200\n"


def test_deprecated_file_format_fields_are_refused(manager: AccessLogManager, tmp_path: Path):
    config = file_pb2.FileAccessLog(path=str(tmp_path / "a.log"), format="%PROTOCOL%")
    proto = accesslog_pb2.AccessLog(typed_config=packed(config))
    with pytest.raises(ConfigError, match=r"typed_config\.format: is not supported"):
        one_logger(manager, proto)


def test_format_from_a_file_is_refused(manager: AccessLogManager, tmp_path: Path):
    log_format = SFS(text_format_source=base_pb2.DataSource(filename="/etc/format"))
    with pytest.raises(ConfigError, match=r"log_format\.text_format_source\.filename"):
        one_logger(manager, file_log(tmp_path / "a.log", log_format))


def test_unknown_logger_type_is_refused(manager: AccessLogManager):
    proto = accesslog_pb2.AccessLog(typed_config=packed(struct_pb2.Struct()))
    with pytest.raises(ConfigError, match=r"typed_config: access logger google.protobuf.Struct"):
        one_logger(manager, proto)


def test_every_bad_entry_is_reported_at_once(manager: AccessLogManager, tmp_path: Path):
    protos = [
        file_log(tmp_path / "a.log", text_format("%NOPE%")),
        file_log(tmp_path / "b.log"),
        accesslog_pb2.AccessLog(),
    ]
    with pytest.raises(ConfigError) as e:
        compile_access_logs(protos, FIELD, manager=manager)
    assert [p.path for p in e.value.problems] == [
        f"{FIELD}[0].typed_config.log_format.text_format_source.inline_string",
        f"{FIELD}[2].typed_config",
    ]


def test_write_failures_are_counted_not_raised():
    sink = LogSink("/broken", os.open(os.devnull, os.O_RDONLY))
    sink.write(b"line\n")
    sink.flush()  # EBADF: the descriptor is read-only
    assert sink.write_failed == 1
    assert sink.buffered == 0
    sink.close()


def test_reopen_follows_a_rotated_file(manager: AccessLogManager, tmp_path: Path):
    path = tmp_path / "rotate.log"
    logger = one_logger(manager, file_log(path, text_format("%RESPONSE_CODE%\n")))
    logger.log(make_info())
    path.rename(tmp_path / "rotate.log.1")
    manager.reopen()  # flushes into the old file, then opens a new one
    logger.log(make_info(response_code=201))
    manager.flush()
    assert (tmp_path / "rotate.log.1").read_text() == "200\n"
    assert path.read_text() == "201\n"
