"""broker.telemetry: id-only spans, W3C propagation over header dicts, hops, exporters from
settings (each exporter really exports: to stdout, and to local OTLP HTTP and gRPC receivers).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import context as _otel_context
from opentelemetry import trace as _trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import ValidationError
from typer.testing import CliRunner

from broker import telemetry
from broker.errors import CallDenied, ConfigError
from broker.runtime import otel
from broker.runtime.audit import AuditEmitter
from broker.settings import Settings
from services.cli.main import app

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


# -- id-only spans and propagation ----------------------------------------------------------


def test_id_only_spans_have_fresh_valid_ids_and_record_nothing() -> None:
    tel = telemetry.Telemetry("test", telemetry.ID_ONLY)
    one, two = tel.start("a"), tel.start("b")
    assert not one.is_recording()
    ids = {telemetry.hex_ids(one), telemetry.hex_ids(two)}
    assert len(ids) == 2
    for trace_id, span_id in ids:
        assert len(trace_id) == 32 and int(trace_id, 16) and len(span_id) == 16


def test_id_only_children_keep_the_trace_its_flags_and_state() -> None:
    tel = telemetry.Telemetry("test", telemetry.ID_ONLY)
    parent = telemetry.extract(
        {"traceparent": TRACEPARENT, "tracestate": "sb=b7ad6b7169203331,vendor=x"}
    )
    child = tel.start("c", parent=parent)
    sc = child.get_span_context()
    assert telemetry.hex_ids(child)[0] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert telemetry.hex_ids(child)[1] != "00f067aa0ba902b7"
    assert sc.trace_flags.sampled
    assert sc.trace_state.get("vendor") == "x"
    assert telemetry.parent_ids(parent) == ("00f067aa0ba902b7", "b7ad6b7169203331")


def test_no_provider_means_the_id_only_one_unless_the_application_set_one() -> None:
    # (No test sets the process-wide provider: it can be set only once.)
    assert telemetry.resolve_provider(None) is telemetry.ID_ONLY
    mine = SdkTracerProvider()
    assert telemetry.resolve_provider(mine) is mine


def test_inject_and_extract_round_trip_through_a_header_dict() -> None:
    tel = telemetry.Telemetry("test", telemetry.ID_ONLY)
    span = tel.start("x", parent=telemetry.extract({"traceparent": TRACEPARENT}))
    headers = telemetry.inject({"Sb-Call-Id": "c1"}, span)
    assert headers["Sb-Call-Id"] == "c1"
    trace_id, span_id = telemetry.hex_ids(span)
    assert headers["traceparent"] == f"00-{trace_id}-{span_id}-01"
    again = telemetry.extract(headers)
    assert telemetry.parent_ids(again) == (span_id, "")
    # Nothing to propagate outside a span; nothing found in empty headers.
    assert telemetry.inject({}) == {}
    assert telemetry.parent_ids(telemetry.extract({})) == ("", "")
    assert telemetry.parent_ids(telemetry.extract({"traceparent": "garbage"})) == ("", "")


def test_a_delivery_writes_itself_into_tracestate_replacing_an_older_one() -> None:
    tel = telemetry.Telemetry("test", telemetry.ID_ONLY)
    upstream = telemetry.extract(
        {"traceparent": TRACEPARENT, "tracestate": "sb=b7ad6b7169203331,other=1"}
    )
    delivery = tel.start("sb.delivery", parent=upstream)
    headers = telemetry.inject({}, delivery, via=True)
    own = telemetry.hex_ids(delivery)[1]
    state = TraceState.from_header([headers["tracestate"]])
    assert state.get("sb") == own and state.get("other") == "1"
    # A raw client's nonsense in the entry is not taken for a span id.
    junk = telemetry.extract({"traceparent": TRACEPARENT, "tracestate": "sb=not-a-span"})
    assert telemetry.parent_ids(junk) == ("00f067aa0ba902b7", "")


def test_a_hop_is_current_while_it_runs_and_audit_events_take_its_ids() -> None:
    exporter = InMemorySpanExporter()
    tel = telemetry.Telemetry("test", otel.tracer_provider(Settings(), exporter=exporter))
    emitter = AuditEmitter.__new__(AuditEmitter)  # event() builds, it needs no connection
    emitter.actor = "service:test"
    headers = {"traceparent": TRACEPARENT, "tracestate": "sb=b7ad6b7169203331"}
    assert telemetry.current_ids() is None
    with tel.hop("sb.decision", headers) as span:
        ids = telemetry.current_ids()
        inner = tel.start("child")
        inner.end()
        event = emitter.event("decision")
        other = emitter.event("usage", trace_id="f" * 32)
        none = emitter.event("admin", span_id="")
    assert telemetry.current_ids() is None
    assert ids == telemetry.AuditIds(
        "4bf92f3577b34da6a3ce929d0e0e4736",
        telemetry.hex_ids(span)[1],
        "00f067aa0ba902b7",
        "b7ad6b7169203331",
    )
    assert (event.trace_id, event.span_id, event.parent_span_id, event.via_span_id) == (
        ids.trace_id, ids.span_id, ids.parent_span_id, ids.via_span_id
    )  # fmt: skip
    assert other.trace_id == "f" * 32 and not other.span_id  # another trace: no span of ours
    assert none.trace_id == "" and not none.span_id
    finished = {s.name: s for s in exporter.get_finished_spans()}
    assert finished["child"].parent is not None
    assert finished["child"].parent.span_id == span.get_span_context().span_id
    assert finished["sb.decision"].kind == SpanKind.SERVER


def test_a_hop_that_raises_is_failed_with_the_error_code() -> None:
    exporter = InMemorySpanExporter()
    tel = telemetry.Telemetry("test", otel.tracer_provider(Settings(), exporter=exporter))
    with pytest.raises(CallDenied), tel.hop("sb.call", kind=SpanKind.CLIENT):
        raise CallDenied("no")
    with pytest.raises(KeyError), tel.hop("sb.serve"):
        raise KeyError("boom")
    denied, crashed = exporter.get_finished_spans()
    assert denied.status.status_code == StatusCode.ERROR
    assert denied.attributes is not None and denied.attributes["signalbox.error.code"] == "denied"
    assert crashed.status.status_code == StatusCode.ERROR
    assert [e.name for e in crashed.events] == ["exception"]


def test_annotate_builds_attributes_only_for_recording_spans() -> None:
    calls: list[int] = []

    def attrs() -> dict[str, Any]:
        calls.append(1)
        return {"a": 1, "empty": "", "none": None, "ids": ["x", "y"]}

    telemetry.annotate(telemetry.Telemetry("t", telemetry.ID_ONLY).start("x"), attrs)
    assert calls == []
    exporter = InMemorySpanExporter()
    span = telemetry.Telemetry("t", otel.tracer_provider(Settings(), exporter=exporter)).start("x")
    telemetry.annotate(span, attrs)
    span.end()
    [done] = exporter.get_finished_spans()
    assert dict(done.attributes or {}) == {"a": 1, "ids": ("x", "y")}


# -- exporters from settings ----------------------------------------------------------------


def test_exporter_none_is_the_default_and_id_only() -> None:
    assert Settings().otel_exporter == "none"
    assert otel.tracer_provider(Settings()) is telemetry.ID_ONLY


def test_otlp_without_an_endpoint_is_a_clear_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(otel_exporter="otlp")
    [error] = info.value.errors()
    assert error["loc"] == ("otel_endpoint",)
    assert "SIGNALBOX_OTEL_ENDPOINT" in error["msg"]
    with pytest.raises(ValidationError):
        Settings(otel_exporter="otlp", otel_endpoint="  ")
    with pytest.raises(ValidationError):
        Settings(otel_protocol="thrift")  # type: ignore[arg-type]
    # Settings copied without validation are caught when the provider is built.
    unchecked = Settings().model_copy(update={"otel_exporter": "otlp"})
    with pytest.raises(ConfigError, match="SIGNALBOX_OTEL_ENDPOINT"):
        otel.tracer_provider(unchecked)
    # The command line says which setting and what to do.
    monkeypatch.setenv("SIGNALBOX_OTEL_EXPORTER", "otlp")
    result = CliRunner().invoke(app, ["up"])
    assert result.exit_code == 1
    assert "invalid setting otel_endpoint" in result.output
    assert "SIGNALBOX_OTEL_ENDPOINT" in result.output


def _one_span(provider: Any, name: str) -> None:
    telemetry.Telemetry("test", provider).start(name).end()
    assert provider.force_flush(5_000)


def test_console_exporter_prints_spans(capfd: pytest.CaptureFixture[str]) -> None:
    provider = otel.tracer_provider(Settings(otel_exporter="console"))
    try:
        _one_span(provider, "sb.console-check")
    finally:
        provider.shutdown()  # type: ignore[attr-defined]
    out = capfd.readouterr().out
    assert '"name": "sb.console-check"' in out
    assert '"service.name": "signalbox"' in out


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()
        self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_receiver() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    received: list[tuple[str, bytes]] = []
    handler = type("Receiver", (_Receiver,), {"received": received})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()


def _names(request: trace_service_pb2.ExportTraceServiceRequest) -> tuple[set[str], set[str]]:
    spans = {s.name for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans}
    services = {
        a.value.string_value
        for rs in request.resource_spans
        for a in rs.resource.attributes
        if a.key == "service.name"
    }
    return spans, services


def test_otlp_http_exports_to_the_endpoint(
    http_receiver: tuple[str, list[tuple[str, bytes]]],
) -> None:
    url, received = http_receiver
    settings = Settings(otel_exporter="otlp", otel_endpoint=url, otel_service_name="sb-test")
    provider = otel.tracer_provider(settings)
    try:
        _one_span(provider, "sb.http-check")
    finally:
        provider.shutdown()  # type: ignore[attr-defined]
    [(path, body)] = received
    assert path == "/v1/traces"  # appended to a URL without a path
    request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
    assert _names(request) == ({"sb.http-check"}, {"sb-test"})


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_otlp_grpc_exports_to_the_endpoint() -> None:
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        settings = Settings(
            otel_exporter="otlp", otel_protocol="grpc", otel_endpoint=f"http://127.0.0.1:{port}"
        )
        provider = otel.tracer_provider(settings)
        try:
            _one_span(provider, "sb.grpc-check")
        finally:
            provider.shutdown()  # type: ignore[attr-defined]
    finally:
        server.stop(grace=None)
    [request] = collector.requests
    assert _names(request) == ({"sb.grpc-check"}, {"signalbox"})


def test_audit_events_outside_any_span_have_no_ids() -> None:
    emitter = AuditEmitter.__new__(AuditEmitter)  # event() builds, it needs no connection
    emitter.actor = "service:test"
    event = emitter.event("admin")
    assert event.trace_id == "" and not event.span_id and not event.parent_span_id


# -- the hand-written W3C path agrees with OpenTelemetry's propagator --------------------------

_KEYS = st.from_regex(r"[a-z][a-z0-9_\-*/]{0,20}", fullmatch=True)
_VALUES = st.from_regex(r"[!-+\--<>-~]{1,30}", fullmatch=True)


@given(
    st.integers(1, 2**128 - 1),
    st.integers(1, 2**64 - 1),
    st.sampled_from([0, 1]),
    st.dictionaries(_KEYS, _VALUES, max_size=4),
    st.booleans(),
)
def test_fast_propagation_matches_opentelemetry(
    trace_id: int, span_id: int, flags: int, state: dict[str, str], via: bool
) -> None:
    otel = TraceContextTextMapPropagator()
    sc = _trace.SpanContext(
        trace_id, span_id, False, _trace.TraceFlags(flags), _trace.TraceState(list(state.items()))
    )
    span = _trace.NonRecordingSpan(sc)
    expected: dict[str, str] = {}
    otel.inject(expected, context=_trace.set_span_in_context(span, _otel_context.Context()))
    if not via:
        assert telemetry.inject({}, span) == expected
    headers = telemetry.inject({}, span, via=via)
    ours = _trace.get_current_span(telemetry.extract(headers)).get_span_context()
    theirs = _trace.get_current_span(
        otel.extract(headers, context=_otel_context.Context())
    ).get_span_context()
    assert ours == theirs
    assert ours.is_remote and (ours.trace_id, ours.span_id) == (trace_id, span_id)
    if via:
        assert ours.trace_state.get(telemetry.STATE_KEY) == f"{span_id:016x}"
        assert {k: v for k, v in ours.trace_state.items() if k != telemetry.STATE_KEY} == {
            k: v for k, v in state.items() if k != telemetry.STATE_KEY
        }


def test_other_traceparent_versions_go_to_opentelemetry() -> None:
    future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"
    sc = _trace.get_current_span(telemetry.extract({"traceparent": future})).get_span_context()
    assert sc.is_valid and sc.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736
    zero = "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
    assert (
        not _trace.get_current_span(telemetry.extract({"traceparent": zero}))
        .get_span_context()
        .is_valid
    )
