"""OTLP's trace messages (opentelemetry-proto, ``opentelemetry/proto/{common,resource,trace,
collector/trace}/v1``), declared here field by field in a private descriptor pool.

Why not the ``opentelemetry-proto`` package: ``xds-protos`` ships its own, older copy of the same
modules (``opentelemetry/proto/...``, from before ``scope_spans``), and whichever package pip
installs last owns the files, so an import could give messages without ``scope_spans``. The wire
format and the JSON mapping depend only on the field names, numbers and types below (OTLP 1.x),
so these messages read and write what any OTLP exporter or collector does. Newer fields that
meshlet does not read (``*_strindex``, ``entity_refs``) are left out; protobuf keeps them as
unknown fields.

The classes are plain protobuf messages: ``ExportTraceServiceRequest.FromString(body)``,
``json_format.Parse(text, ExportTraceServiceRequest())``, ``Span.SPAN_KIND_SERVER``,
``Status.STATUS_CODE_ERROR``.
"""

from __future__ import annotations

from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_REPEATED: Final = _F.LABEL_REPEATED
_OPTIONAL: Final = _F.LABEL_OPTIONAL

# (name, number, type, repeated, type name (messages and enums), oneof index)
_Field = tuple[str, int, int, bool, str, int | None]


def _message(
    name: str,
    fields: list[_Field],
    *,
    oneofs: tuple[str, ...] = (),
    nested: tuple[descriptor_pb2.DescriptorProto, ...] = (),
    enums: tuple[descriptor_pb2.EnumDescriptorProto, ...] = (),
) -> descriptor_pb2.DescriptorProto:
    message = descriptor_pb2.DescriptorProto(name=name)
    for oneof in oneofs:
        message.oneof_decl.add(name=oneof)
    for field_name, number, type_, repeated, type_name, oneof_index in fields:
        field = message.field.add(
            name=field_name,
            number=number,
            type=type_,
            label=_REPEATED if repeated else _OPTIONAL,
            json_name=_json_name(field_name),
        )
        if type_name:
            field.type_name = type_name
        if oneof_index is not None:
            field.oneof_index = oneof_index
    message.nested_type.extend(nested)
    message.enum_type.extend(enums)
    return message


def _json_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _enum(name: str, values: list[tuple[str, int]]) -> descriptor_pb2.EnumDescriptorProto:
    enum = descriptor_pb2.EnumDescriptorProto(name=name)
    for value_name, number in values:
        enum.value.add(name=value_name, number=number)
    return enum


def _file(
    name: str, package: str, messages: list[descriptor_pb2.DescriptorProto], deps: list[str]
) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(name=name, package=package, syntax="proto3")
    proto.dependency.extend(deps)
    proto.message_type.extend(messages)
    return proto


_COMMON = "opentelemetry.proto.common.v1"
_RESOURCE = "opentelemetry.proto.resource.v1"
_TRACE = "opentelemetry.proto.trace.v1"
_COLLECTOR = "opentelemetry.proto.collector.trace.v1"
_KV = f".{_COMMON}.KeyValue"

_files = [
    _file(
        "opentelemetry/proto/common/v1/common.proto",
        _COMMON,
        [
            _message(
                "AnyValue",
                [
                    ("string_value", 1, _F.TYPE_STRING, False, "", 0),
                    ("bool_value", 2, _F.TYPE_BOOL, False, "", 0),
                    ("int_value", 3, _F.TYPE_INT64, False, "", 0),
                    ("double_value", 4, _F.TYPE_DOUBLE, False, "", 0),
                    ("array_value", 5, _F.TYPE_MESSAGE, False, f".{_COMMON}.ArrayValue", 0),
                    ("kvlist_value", 6, _F.TYPE_MESSAGE, False, f".{_COMMON}.KeyValueList", 0),
                    ("bytes_value", 7, _F.TYPE_BYTES, False, "", 0),
                ],
                oneofs=("value",),
            ),
            _message(
                "ArrayValue",
                [("values", 1, _F.TYPE_MESSAGE, True, f".{_COMMON}.AnyValue", None)],
            ),
            _message("KeyValueList", [("values", 1, _F.TYPE_MESSAGE, True, _KV, None)]),
            _message(
                "KeyValue",
                [
                    ("key", 1, _F.TYPE_STRING, False, "", None),
                    ("value", 2, _F.TYPE_MESSAGE, False, f".{_COMMON}.AnyValue", None),
                ],
            ),
            _message(
                "InstrumentationScope",
                [
                    ("name", 1, _F.TYPE_STRING, False, "", None),
                    ("version", 2, _F.TYPE_STRING, False, "", None),
                    ("attributes", 3, _F.TYPE_MESSAGE, True, _KV, None),
                    ("dropped_attributes_count", 4, _F.TYPE_UINT32, False, "", None),
                ],
            ),
        ],
        [],
    ),
    _file(
        "opentelemetry/proto/resource/v1/resource.proto",
        _RESOURCE,
        [
            _message(
                "Resource",
                [
                    ("attributes", 1, _F.TYPE_MESSAGE, True, _KV, None),
                    ("dropped_attributes_count", 2, _F.TYPE_UINT32, False, "", None),
                ],
            )
        ],
        ["opentelemetry/proto/common/v1/common.proto"],
    ),
    _file(
        "opentelemetry/proto/trace/v1/trace.proto",
        _TRACE,
        [
            _message(
                "ResourceSpans",
                [
                    ("resource", 1, _F.TYPE_MESSAGE, False, f".{_RESOURCE}.Resource", None),
                    ("scope_spans", 2, _F.TYPE_MESSAGE, True, f".{_TRACE}.ScopeSpans", None),
                    ("schema_url", 3, _F.TYPE_STRING, False, "", None),
                ],
            ),
            _message(
                "ScopeSpans",
                [
                    ("scope", 1, _F.TYPE_MESSAGE, False, f".{_COMMON}.InstrumentationScope", None),
                    ("spans", 2, _F.TYPE_MESSAGE, True, f".{_TRACE}.Span", None),
                    ("schema_url", 3, _F.TYPE_STRING, False, "", None),
                ],
            ),
            _message(
                "Span",
                [
                    ("trace_id", 1, _F.TYPE_BYTES, False, "", None),
                    ("span_id", 2, _F.TYPE_BYTES, False, "", None),
                    ("trace_state", 3, _F.TYPE_STRING, False, "", None),
                    ("parent_span_id", 4, _F.TYPE_BYTES, False, "", None),
                    ("flags", 16, _F.TYPE_FIXED32, False, "", None),
                    ("name", 5, _F.TYPE_STRING, False, "", None),
                    ("kind", 6, _F.TYPE_ENUM, False, f".{_TRACE}.Span.SpanKind", None),
                    ("start_time_unix_nano", 7, _F.TYPE_FIXED64, False, "", None),
                    ("end_time_unix_nano", 8, _F.TYPE_FIXED64, False, "", None),
                    ("attributes", 9, _F.TYPE_MESSAGE, True, _KV, None),
                    ("dropped_attributes_count", 10, _F.TYPE_UINT32, False, "", None),
                    ("events", 11, _F.TYPE_MESSAGE, True, f".{_TRACE}.Span.Event", None),
                    ("dropped_events_count", 12, _F.TYPE_UINT32, False, "", None),
                    ("links", 13, _F.TYPE_MESSAGE, True, f".{_TRACE}.Span.Link", None),
                    ("dropped_links_count", 14, _F.TYPE_UINT32, False, "", None),
                    ("status", 15, _F.TYPE_MESSAGE, False, f".{_TRACE}.Status", None),
                ],
                nested=(
                    _message(
                        "Event",
                        [
                            ("time_unix_nano", 1, _F.TYPE_FIXED64, False, "", None),
                            ("name", 2, _F.TYPE_STRING, False, "", None),
                            ("attributes", 3, _F.TYPE_MESSAGE, True, _KV, None),
                            ("dropped_attributes_count", 4, _F.TYPE_UINT32, False, "", None),
                        ],
                    ),
                    _message(
                        "Link",
                        [
                            ("trace_id", 1, _F.TYPE_BYTES, False, "", None),
                            ("span_id", 2, _F.TYPE_BYTES, False, "", None),
                            ("trace_state", 3, _F.TYPE_STRING, False, "", None),
                            ("attributes", 4, _F.TYPE_MESSAGE, True, _KV, None),
                            ("dropped_attributes_count", 5, _F.TYPE_UINT32, False, "", None),
                            ("flags", 6, _F.TYPE_FIXED32, False, "", None),
                        ],
                    ),
                ),
                enums=(
                    _enum(
                        "SpanKind",
                        [
                            ("SPAN_KIND_UNSPECIFIED", 0),
                            ("SPAN_KIND_INTERNAL", 1),
                            ("SPAN_KIND_SERVER", 2),
                            ("SPAN_KIND_CLIENT", 3),
                            ("SPAN_KIND_PRODUCER", 4),
                            ("SPAN_KIND_CONSUMER", 5),
                        ],
                    ),
                ),
            ),
            _message(
                "Status",
                [
                    ("message", 2, _F.TYPE_STRING, False, "", None),
                    ("code", 3, _F.TYPE_ENUM, False, f".{_TRACE}.Status.StatusCode", None),
                ],
                enums=(
                    _enum(
                        "StatusCode",
                        [("STATUS_CODE_UNSET", 0), ("STATUS_CODE_OK", 1), ("STATUS_CODE_ERROR", 2)],
                    ),
                ),
            ),
        ],
        [
            "opentelemetry/proto/common/v1/common.proto",
            "opentelemetry/proto/resource/v1/resource.proto",
        ],
    ),
    _file(
        "opentelemetry/proto/collector/trace/v1/trace_service.proto",
        _COLLECTOR,
        [
            _message(
                "ExportTraceServiceRequest",
                [("resource_spans", 1, _F.TYPE_MESSAGE, True, f".{_TRACE}.ResourceSpans", None)],
            ),
            _message(
                "ExportTraceServiceResponse",
                [
                    (
                        "partial_success",
                        1,
                        _F.TYPE_MESSAGE,
                        False,
                        f".{_COLLECTOR}.ExportTracePartialSuccess",
                        None,
                    )
                ],
            ),
            _message(
                "ExportTracePartialSuccess",
                [
                    ("rejected_spans", 1, _F.TYPE_INT64, False, "", None),
                    ("error_message", 2, _F.TYPE_STRING, False, "", None),
                ],
            ),
        ],
        ["opentelemetry/proto/trace/v1/trace.proto"],
    ),
]

#: A pool of its own: the default pool may hold xds-protos' older copy under the same names.
POOL: Final = descriptor_pool.DescriptorPool()
for _proto in _files:
    POOL.Add(_proto)


def _class(full_name: str) -> Any:
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name))


AnyValue: Any = _class(f"{_COMMON}.AnyValue")
ArrayValue: Any = _class(f"{_COMMON}.ArrayValue")
KeyValueList: Any = _class(f"{_COMMON}.KeyValueList")
KeyValue: Any = _class(f"{_COMMON}.KeyValue")
InstrumentationScope: Any = _class(f"{_COMMON}.InstrumentationScope")
Resource: Any = _class(f"{_RESOURCE}.Resource")
ResourceSpans: Any = _class(f"{_TRACE}.ResourceSpans")
ScopeSpans: Any = _class(f"{_TRACE}.ScopeSpans")
Span: Any = _class(f"{_TRACE}.Span")
Status: Any = _class(f"{_TRACE}.Status")
ExportTraceServiceRequest: Any = _class(f"{_COLLECTOR}.ExportTraceServiceRequest")
ExportTraceServiceResponse: Any = _class(f"{_COLLECTOR}.ExportTraceServiceResponse")
ExportTracePartialSuccess: Any = _class(f"{_COLLECTOR}.ExportTracePartialSuccess")

__all__ = [
    "POOL",
    "AnyValue",
    "ArrayValue",
    "ExportTracePartialSuccess",
    "ExportTraceServiceRequest",
    "ExportTraceServiceResponse",
    "InstrumentationScope",
    "KeyValue",
    "KeyValueList",
    "Resource",
    "ResourceSpans",
    "ScopeSpans",
    "Span",
    "Status",
]
