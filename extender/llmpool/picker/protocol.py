"""Envoy ext_proc messages of the Endpoint Picker Protocol: reading what Envoy sends and
building what the picker answers. Pure functions over the xds-protos messages; no state.

Constants are the protocol's (Gateway API Inference Extension, protocol v1.0.0).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

DESTINATION_NAMESPACE = "envoy.lb"
DESTINATION_KEY = "x-gateway-destination-endpoint"
SERVED_KEY = "x-gateway-destination-endpoint-served"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
CONFORMANCE_SELECT_HEADER = "test-epp-endpoint-selection"
CONFORMANCE_SERVED_HEADER = "x-conformance-test-served-endpoint"
DROPPED_REASON_HEADER = "x-llm-d-request-dropped-reason"
#: Some Envoy builds cap one streamed body message at 64 KiB; the reference picker uses this.
BODY_CHUNK_BYTES = 62_000

#: Headers a client may not set: the routing result, and the picker's control headers.
STRIPPED_HEADERS = (DESTINATION_KEY, SERVED_KEY, CONFORMANCE_SELECT_HEADER)

FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_STATUS = {
    400: http_status_pb2.BadRequest,
    404: http_status_pb2.NotFound,
    429: http_status_pb2.TooManyRequests,
    500: http_status_pb2.InternalServerError,
    503: http_status_pb2.ServiceUnavailable,
}


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------


def headers_of(msg: pb.HttpHeaders) -> dict[str, str]:
    """Header map with lower-cased keys; ``raw_value`` first, ``value`` as fallback."""
    out: dict[str, str] = {}
    for h in msg.headers.headers:
        v = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        out[h.key.lower()] = v
    return out


def _struct_field(md: base_pb2.Metadata, namespace: str, key: str) -> struct_pb2.Value | None:
    if namespace not in md.filter_metadata:
        return None
    fields = md.filter_metadata[namespace].fields
    value: struct_pb2.Value | None = fields.get(key)
    return value


def subset_hint(md: base_pb2.Metadata) -> list[str] | None:
    """The gateway's subset hint (``ip:port`` or ``ip`` strings), or None when absent.

    Accepts a list value or a comma-separated string (both exist in the wild); an empty
    list is a hint too (and means: no endpoint is eligible)."""
    v = _struct_field(md, SUBSET_NAMESPACE, SUBSET_KEY)
    if v is None:
        return None
    kind = v.WhichOneof("kind")
    if kind == "list_value":
        return [x.string_value.strip() for x in v.list_value.values if x.string_value.strip()]
    if kind == "string_value":
        return [p.strip() for p in v.string_value.split(",") if p.strip()]
    return []


def served_endpoint(md: base_pb2.Metadata) -> str | None:
    """The endpoint the gateway actually used (on the response path), if it reports it."""
    v = _struct_field(md, DESTINATION_NAMESPACE, SERVED_KEY)
    if v is None or v.WhichOneof("kind") != "string_value":
        return None
    return v.string_value or None


def host_of(endpoint: str) -> str:
    """``10.0.0.1`` of ``10.0.0.1:8000`` (an IPv6 ``[::1]:80`` gives ``::1``)."""
    host = endpoint.rsplit(":", 1)[0] if endpoint.count(":") == 1 or endpoint.startswith("[") else endpoint
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


# ------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------


# Messages are built in place: a nested constructor call copies each submessage (and the
# body bytes with it) into its parent, which made a streamed body answer ~5x slower.


def header_option(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()), append_action=_OVERWRITE
    )


def _fill_mutation(
    m: pb.HeaderMutation, set_headers: Mapping[str, str] | None, remove: Iterable[str]
) -> None:
    if set_headers:
        add = m.set_headers.add
        for k, v in set_headers.items():
            opt = add()
            opt.header.key = k
            opt.header.raw_value = v.encode()
            opt.append_action = _OVERWRITE
    if remove:
        m.remove_headers.extend(remove)


def mutation(set_headers: Mapping[str, str] | None = None, remove: Iterable[str] = ()) -> pb.HeaderMutation:
    m = pb.HeaderMutation()
    _fill_mutation(m, set_headers, remove)
    return m


def _fill_destination(md: struct_pb2.Struct, value: str) -> None:
    md.fields[DESTINATION_NAMESPACE].struct_value.fields[DESTINATION_KEY].string_value = value


def destination_metadata(value: str) -> struct_pb2.Struct:
    md = struct_pb2.Struct()
    _fill_destination(md, value)
    return md


def routed_headers_response(
    destination: str, set_headers: Mapping[str, str], remove: Iterable[str] = ()
) -> pb.ProcessingResponse:
    """The request-headers answer that routes: destination header + ``envoy.lb`` metadata with
    the same value, and ``clear_route_cache`` so the route is chosen again."""
    out = pb.ProcessingResponse()
    common = out.request_headers.response
    common.clear_route_cache = True
    _fill_mutation(common.header_mutation, {DESTINATION_KEY: destination, **set_headers}, remove)
    _fill_destination(out.dynamic_metadata, destination)
    return out


def routed_body_response(
    destination: str, set_headers: Mapping[str, str], body: bytes | None, remove: Iterable[str] = ()
) -> pb.ProcessingResponse:
    """BUFFERED mode: the request-body answer carries the routing header, metadata and body."""
    out = pb.ProcessingResponse()
    common = out.request_body.response
    common.clear_route_cache = True
    _fill_mutation(common.header_mutation, {DESTINATION_KEY: destination, **set_headers}, remove)
    if body is not None:
        common.body_mutation.body = body
    _fill_destination(out.dynamic_metadata, destination)
    return out


def plain_headers_response(
    *, request: bool, set_headers: Mapping[str, str] | None = None, remove: Iterable[str] = ()
) -> pb.ProcessingResponse:
    out = pb.ProcessingResponse()
    common = (out.request_headers if request else out.response_headers).response
    if set_headers or remove:
        _fill_mutation(common.header_mutation, set_headers, remove)
    else:
        common.SetInParent()
    return out


def body_chunks(body: bytes, *, request: bool, end: bool = True) -> Iterator[pb.ProcessingResponse]:
    """Full-duplex streamed body answers of at most :data:`BODY_CHUNK_BYTES` each, in order;
    the last one carries ``end_of_stream=end`` (an empty body gives one empty message)."""
    n = len(body)
    if n <= BODY_CHUNK_BYTES:
        yield streamed_body(body, end=end, request=request)
        return
    off = 0
    while True:
        piece = body[off : off + BODY_CHUNK_BYTES]
        off += BODY_CHUNK_BYTES
        last = off >= n
        yield streamed_body(piece, end=end and last, request=request)
        if last:
            return


def streamed_body(chunk: bytes, *, end: bool, request: bool) -> pb.ProcessingResponse:
    out = pb.ProcessingResponse()
    sr = (out.request_body if request else out.response_body).response.body_mutation.streamed_response
    sr.body = chunk
    sr.end_of_stream = end
    return out


def buffered_body_response(*, request: bool, body: bytes | None = None) -> pb.ProcessingResponse:
    out = pb.ProcessingResponse()
    common = (out.request_body if request else out.response_body).response
    if body is not None:
        common.body_mutation.body = body
    else:
        common.SetInParent()
    return out


def trailers_response(*, request: bool) -> pb.ProcessingResponse:
    out = pb.ProcessingResponse()
    (out.request_trailers if request else out.response_trailers).SetInParent()
    return out


def immediate(status: int, message: str, headers: Mapping[str, str] | None = None) -> pb.ProcessingResponse:
    """An HTTP answer from the picker itself (400/429/503...), JSON body like vLLM's errors."""
    import orjson

    body = orjson.dumps(
        {"error": {"message": message, "type": _ERROR_TYPE.get(status, "Error"), "code": status}}
    )
    hdrs = {"content-type": "application/json", **(headers or {})}
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=_STATUS.get(status, http_status_pb2.InternalServerError)),
            headers=mutation(hdrs),
            body=body,
            details=message[:200],
        )
    )


_ERROR_TYPE = {
    400: "BadRequestError",
    429: "TooManyRequestsError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}
