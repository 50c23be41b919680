"""The ext_proc servicer: one state machine per gRPC stream (= one HTTP request).

Full-duplex streamed mode (what gateways program; the default when Envoy does not say):

1. ``request_headers``: kept; not answered yet (unless they end the request: a GET is
   routed at once);
2. ``request_body`` chunks: buffered until end of stream; then the request is routed and
   the picker answers the headers (destination header + ``envoy.lb`` metadata +
   ``clear_route_cache``) and streams the (possibly rewritten) body back in chunks of at
   most 62,000 bytes, in order;
3. ``response_headers``: status and content type noted, served endpoint read, answered;
4. ``response_body`` chunks: usage and streamed tokens read on the side; chunks passed
   back at once, byte for byte unless the picker must change them;
5. ``trailers``: answered.

Buffered mode (``request_body_mode: BUFFERED``) answers the headers at once and routes in
the body answer. Whatever arrives, in whatever order, gets a well-formed answer; the
stream's request is always released when the stream ends (normally, by a client going
away, or by an error), so no per-request state outlives it. Unexpected failures end the
stream with gRPC INTERNAL, so the gateway's failure mode (FailOpen/FailClose) applies.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from llmpool.picker import protocol
from llmpool.picker.bodies import ResponseTap
from llmpool.picker.director import Director, Rejected, Routed

log = logging.getLogger("llmpool.picker")


class StreamState:
    """Per-stream state (what :meth:`ExtProcServicer.open_stream` hands a transport)."""

    __slots__ = (
        "body",
        "body_mode",
        "ended",
        "headers",
        "response_mode",
        "routed",
        "sent_request",
        "status",
        "subset",
        "tap",
    )

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.body_mode = protocol.FULL_DUPLEX
        self.response_mode = protocol.FULL_DUPLEX
        self.subset: list[str] | None = None
        self.routed: Routed | None = None
        self.sent_request = False  # the request side has been answered
        self.status = 0
        self.tap: ResponseTap | None = None
        self.ended = False  # an immediate response was sent, or the response's end of stream answered


class StreamFailed(Exception):
    """An unexpected failure inside one stream: the transport ends that stream with INTERNAL."""


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """The ext_proc state machine. :meth:`process` is transport-neutral (a stream of
    ``ProcessingRequest`` in, ``ProcessingResponse`` out); :meth:`Process` is its grpc.aio
    binding, and :mod:`llmpool.picker.transport` binds it to grpclib."""

    def __init__(self, director: Director) -> None:
        self.director = director
        self.open_streams = 0

    async def Process(  # the gRPC method's name
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        try:
            async for out in self.process(request_iterator):
                yield out
        except StreamFailed as err:
            await context.abort(grpc.StatusCode.INTERNAL, str(err))

    # A stream's life, for transports that drive it message by message (``h2``): open it,
    # hand it each message in order, close it once, whatever happened.
    def open_stream(self) -> StreamState:
        self.open_streams += 1
        return StreamState()

    async def handle(self, st: StreamState, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        """The answers to one message of stream ``st``; ``st.ended`` says the exchange is over.
        Raises :class:`StreamFailed` on an unexpected failure."""
        try:
            return await self._handle(st, msg)
        except Exception as err:  # never crash the server: end this stream with INTERNAL
            raise self._failed(err) from err

    def close_stream(self, st: StreamState) -> None:
        """The stream is gone (ended, cut or failed): release its request."""
        self.open_streams -= 1
        self._finish(st, complete=False)

    async def drained(self, grace_s: float) -> None:
        """Return once no stream is open, or after ``grace_s`` (a transport's drain)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.open_streams > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)

    def _failed(self, err: Exception) -> StreamFailed:
        self.director.metrics.stream_errors.inc()
        log.exception("ext_proc stream failed: %s", err)
        return StreamFailed(f"picker error: {type(err).__name__}")

    async def process(
        self, messages: AsyncIterator[pb.ProcessingRequest]
    ) -> AsyncIterator[pb.ProcessingResponse]:
        """Answer one ext_proc stream given as an async iterator (the ``grpclib`` and
        ``grpcio`` transports). Ends (returns) once the exchange is over; raises
        :class:`StreamFailed` on an unexpected failure; the request is always released."""
        st = self.open_stream()
        try:
            async for msg in messages:
                for out in await self.handle(st, msg):
                    yield out
                if st.ended:
                    # An immediate response, or the response's end of stream answered: the
                    # exchange is over. End the call ourselves rather than wait for Envoy to cancel
                    # it (cancelled grpc.aio calls leave native memory behind).
                    return
        except StreamFailed:
            raise
        except Exception as err:
            raise self._failed(err) from err
        finally:
            self.close_stream(st)

    async def _handle(self, st: StreamState, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        """The answers to one message (a coroutine, not a generator: one per message is cheap)."""
        if msg.HasField("protocol_config"):
            pc = msg.protocol_config
            st.body_mode = pc.request_body_mode or protocol.FULL_DUPLEX
            st.response_mode = pc.response_body_mode or protocol.FULL_DUPLEX
        kind = msg.WhichOneof("request")
        if kind == "request_body":
            return await self._request_body(st, msg)
        if kind == "response_body":
            return self._response_body(st, msg.response_body)
        if kind == "response_headers":
            return [self._response_headers(st, msg)]
        if kind == "request_headers":
            return self._request_headers(st, msg)
        if kind == "request_trailers":
            out = [] if st.sent_request else await self._route(st)  # trailers end the body: route now
            out.append(protocol.trailers_response(request=True))
            return out
        if kind == "response_trailers":
            self._finish(st, complete=True)
            return [protocol.trailers_response(request=False)]
        return []

    # ------------------------------------------------------------------ request path
    def _request_headers(self, st: StreamState, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        if st.sent_request:  # out of order: the request was answered already
            return [protocol.plain_headers_response(request=True)]
        st.headers = protocol.headers_of(msg.request_headers)
        if msg.HasField("metadata_context"):
            st.subset = protocol.subset_hint(msg.metadata_context)
        if msg.request_headers.end_of_stream:  # no body: route at once
            res = self.director.route_headers_only(st.headers, st.subset)
            st.sent_request = True
            if isinstance(res, Rejected):
                return [self._reject(st, res)]
            st.routed = res
            return [
                protocol.routed_headers_response(res.destination, res.set_headers, protocol.STRIPPED_HEADERS)
            ]
        if st.body_mode != protocol.FULL_DUPLEX:
            # buffered: route in the body answer; headers pass now (client routing headers dropped)
            return [protocol.plain_headers_response(request=True, remove=protocol.STRIPPED_HEADERS)]
        return []

    async def _request_body(self, st: StreamState, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        body = msg.request_body
        if msg.HasField("metadata_context"):
            hint = protocol.subset_hint(msg.metadata_context)
            if hint is not None:
                st.subset = hint
        if st.sent_request:  # a body after the request was answered: pass it on unchanged
            return [self._passthrough_body(st, body.body, body.end_of_stream, request=True)]
        st.body.append(body.body)
        if body.end_of_stream or st.body_mode == protocol.BUFFERED:
            return await self._route(st)
        return []

    def _passthrough_body(
        self, st: StreamState, chunk: bytes, end: bool, *, request: bool
    ) -> pb.ProcessingResponse:
        mode = st.body_mode if request else st.response_mode
        if mode == protocol.FULL_DUPLEX:
            return protocol.streamed_body(chunk, end=end, request=request)
        return protocol.buffered_body_response(request=request)

    async def _route(self, st: StreamState) -> list[pb.ProcessingResponse]:
        raw = st.body[0] if len(st.body) == 1 else b"".join(st.body)
        st.body = []
        st.sent_request = True
        res = await self.director.route(st.headers, raw, st.subset)
        if isinstance(res, Rejected):
            return [self._reject(st, res)]
        st.routed = res
        body = res.body
        if st.body_mode == protocol.FULL_DUPLEX:
            hdrs = res.set_headers
            if body is None:
                hdrs = {**hdrs, "content-length": str(len(raw))}
            out = [protocol.routed_headers_response(res.destination, hdrs, protocol.STRIPPED_HEADERS)]
            out.extend(protocol.body_chunks(raw if body is None else body, request=True))
            return out
        return [
            protocol.routed_body_response(res.destination, res.set_headers, body, protocol.STRIPPED_HEADERS)
        ]

    def _reject(self, st: StreamState, res: Rejected) -> pb.ProcessingResponse:
        st.ended = True  # an immediate response ends the exchange
        m = self.director.metrics
        m.rejections.labels(res.reason or str(res.status)).inc()
        m.count_response(res.status)
        headers = {protocol.DROPPED_REASON_HEADER: res.reason} if res.reason else None
        return protocol.immediate(res.status, res.message, headers)

    # ------------------------------------------------------------------ response path
    def _response_headers(self, st: StreamState, msg: pb.ProcessingRequest) -> pb.ProcessingResponse:
        headers = protocol.headers_of(msg.response_headers)
        try:
            st.status = int(headers.get(":status", "0"))
        except ValueError:
            st.status = 0
        routed = st.routed
        set_headers: dict[str, str] = {}
        remove: list[str] = []
        if msg.HasField("metadata_context"):
            served = protocol.served_endpoint(msg.metadata_context)
            if served is not None:
                set_headers[protocol.CONFORMANCE_SERVED_HEADER] = served
                if routed is not None:
                    self.director.served(routed, served)
        if routed is not None and st.tap is None:
            sse = "text/event-stream" in headers.get("content-type", "")
            strip = routed.strip_usage and st.status == 200
            model_back = routed.model_back if st.status == 200 else None
            st.tap = ResponseTap(sse=sse, strip_usage=strip, model_back=model_back)
            if (strip or model_back) and "content-length" in headers:
                remove.append("content-length")
        self.director.metrics.count_response(st.status)
        if msg.response_headers.end_of_stream:
            self._finish(st, complete=True)
        return protocol.plain_headers_response(request=False, set_headers=set_headers, remove=remove)

    def _response_body(self, st: StreamState, body: pb.HttpBody) -> list[pb.ProcessingResponse]:
        tap = st.tap
        end = body.end_of_stream
        if tap is None or st.routed is None:
            if end:
                self._finish(st, complete=True)
            return [self._passthrough_body(st, body.body, end, request=False)]
        out = tap.feed(body.body, end)
        self.director.progress(st.routed, tap)
        if end:
            self._finish(st, complete=True)
        if st.response_mode == protocol.FULL_DUPLEX:
            if out is body.body or len(out) <= protocol.BODY_CHUNK_BYTES:
                if not out and not end:
                    return []
                return [protocol.streamed_body(out, end=end, request=False)]
            return list(protocol.body_chunks(out, request=False, end=end))
        changed = out is not body.body and out != body.body
        return [protocol.buffered_body_response(request=False, body=out if changed else None)]

    def _finish(self, st: StreamState, *, complete: bool) -> None:
        if complete:
            st.ended = True
        if st.routed is not None and not st.routed.finished:
            self.director.finish(st.routed, st.status, st.tap, complete=complete)
