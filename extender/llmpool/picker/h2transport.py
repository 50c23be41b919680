"""The ``h2`` transport: gRPC for ext_proc and health served directly on the ``h2`` library.

grpclib puts each message through an asyncio queue and a handler task, and writes each of
its HTTP/2 frames to the socket as soon as it is made. This transport is cut to what the
picker serves (a bidirectional ext_proc stream and gRPC health), and on the hot path it:

* hands each ext_proc message to the servicer within the socket read that completed it, and
  runs the servicer's coroutine *eagerly*: when the message is answered without waiting for
  anything (every message but a request held at the router, or one waiting on a blocking
  predictor), the answer is built in the same call and no task is created;
* writes everything one read produced (the stream's response HEADERS, both routing answers,
  window updates, the trailers) to the socket in one write, so Envoy reads the answer to a
  message in one go.

A message whose handling does wait continues in a task; later messages of the same stream
queue behind it, so each stream's answers stay in order. Flow control is honoured both
ways (``h2`` keeps the windows; data beyond the peer's window waits for its WINDOW_UPDATE).
Client cancellations (RST_STREAM) and lost connections release the stream's request.
Health (``grpc.health.v1.Health`` Check and Watch) is served on both ports like the other
transports; unknown methods get UNIMPLEMENTED. No message compression (Envoy sends none):
a compressed message fails its stream with INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import deque
from collections.abc import Coroutine, Generator
from typing import Any, cast
from urllib.parse import quote

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2

from llmpool.picker.servicer import ExtProcServicer, StreamFailed

log = logging.getLogger("llmpool.picker")

PROCESS_PATH = b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"
CHECK_PATH = b"/grpc.health.v1.Health/Check"
WATCH_PATH = b"/grpc.health.v1.Health/Watch"
#: Our receive window per stream and per connection: large enough that Envoy never waits on
#: our WINDOW_UPDATEs for a request (a body echo is at most one 62,000-byte chunk at a time).
RECEIVE_WINDOW = 4 * 1024 * 1024
CLOSED_STREAMS_REMEMBERED = 4096
#: The largest gRPC message accepted (Envoy sends a body in chunks of its buffer size, 4 MiB by
#: default); a larger length prefix fails the stream with RESOURCE_EXHAUSTED before buffering.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

OK, NOT_FOUND, RESOURCE_EXHAUSTED, INTERNAL, UNIMPLEMENTED, UNAVAILABLE = 0, 5, 8, 13, 12, 14
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
_RESPONSE_HEADERS = ((b":status", b"200"), (b"content-type", b"application/grpc"))
_OK_TRAILERS = ((b"grpc-status", b"0"),)


def grpc_frame(msg: Message) -> bytes:
    """One length-prefixed, uncompressed gRPC message."""
    data = msg.SerializeToString()
    return b"\x00" + len(data).to_bytes(4, "big") + data


class _Eager:
    """Continue, inside a task, a coroutine that was started by hand and suspended on ``first``
    (what it yielded). Hands each future it waits on up to the task and each resumption (or
    cancellation) back down, exactly as if the task had run it from the start."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, None, Any]:
        coro, waiting = self.coro, self.first
        while True:
            try:
                yield waiting
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # the task was cancelled (or thrown into): pass it down
                try:
                    waiting = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                waiting = coro.send(None)
            except StopIteration as stop:
                return stop.value


class _Call:
    """One gRPC stream on a connection."""

    __slots__ = (
        "busy",
        "done",
        "inbox",
        "input_ended",
        "kind",
        "pending",
        "rx",
        "sent_headers",
        "sid",
        "st",
        "task",
        "trailers",
        "watch",
    )

    def __init__(self, sid: int, kind: bytes) -> None:
        self.sid = sid
        self.kind = kind
        self.rx = bytearray()  # received bytes not yet a whole message
        self.inbox: deque[bytes] = deque()  # messages waiting behind a busy handler
        self.busy = False  # a handler task is running for this stream
        self.task: asyncio.Task[None] | None = None
        self.st: Any = None  # the servicer's per-stream state (ext_proc)
        self.input_ended = False
        self.sent_headers = False
        self.pending = bytearray()  # data waiting for the peer's flow-control window
        self.trailers: tuple[tuple[bytes, bytes], ...] | None = None  # to send once pending is out
        self.done = False
        self.watch: str | None = None  # a health Watch: the service watched


class HealthState:
    """Health statuses, and the Watch streams to tell when one changes."""

    def __init__(self) -> None:
        self.status: dict[str, int] = {}
        self.watchers: dict[tuple[_Connection, int], str] = {}

    def set(self, service: str, serving: bool) -> None:
        status = _SERVING if serving else _NOT_SERVING
        if self.status.get(service) == status:
            return
        self.status[service] = status
        for (conn, sid), name in list(self.watchers.items()):
            if name == service:
                conn.send_health(sid, status)


class H2Server:
    """The listening side: a set of :class:`_Connection` protocols sharing one servicer."""

    def __init__(self, servicer: ExtProcServicer | None, health: HealthState) -> None:
        self.servicer = servicer  # None: a health-only port
        self.health = health
        self.draining = False
        self.connections: set[_Connection] = set()
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _Connection(self), host, port, ssl=tls, reuse_address=True
        )

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.close()

    async def wait_closed(self) -> None:
        if self.server is not None:
            await self.server.wait_closed()


class _H2Connection(h2.connection.H2Connection):
    # h2 remembers the ids of a connection's last 65,536 closed streams (to answer late frames
    # on them correctly): ~10 MiB per gateway connection, a slow RSS climb over the first 65k
    # requests. A few thousand cover any late frame. (Read when the connection is made.)
    MAX_CLOSED_STREAMS = CLOSED_STREAMS_REMEMBERED


class _Connection(asyncio.Protocol):
    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.servicer = server.servicer
        cfg = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            # ours are constants, valid by construction; inbound headers are still checked
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = _H2Connection(config=cfg)
        self.calls: dict[int, _Call] = {}
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()

    # ------------------------------------------------------------------ connection
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's is not a subclass of asyncio.Transport, but has its API)
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)
        self.h2.initiate_connection()
        self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: RECEIVE_WINDOW})
        self.h2.increment_flow_control_window(RECEIVE_WINDOW - 65_535)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for call in list(self.calls.values()):
            self._drop(call)
        self.transport = None

    def close(self) -> None:
        if self.transport is not None:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection()
            self.flush()
            self.transport.close()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as err:
            log.warning("gRPC connection closed: HTTP/2 protocol error: %s", err)
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.DataReceived):
                self._data(ev)
            elif isinstance(ev, h2.events.RequestReceived):
                self._request(ev)
            elif isinstance(ev, h2.events.StreamEnded):
                call = self.calls.get(ev.stream_id)
                if call is not None:
                    call.input_ended = True
                    self._input_ended(call)
            elif isinstance(ev, h2.events.WindowUpdated):
                self._window_updated(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                call = self.calls.get(ev.stream_id)
                if call is not None:
                    self._drop(call)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                for call in list(self.calls.values()):
                    self._drop(call)
        self.flush()

    # ------------------------------------------------------------------ streams in
    def _request(self, ev: h2.events.RequestReceived) -> None:
        path = b""
        for k, v in ev.headers or ():
            if k == b":path":
                path = v
                break
        sid = ev.stream_id
        call = _Call(sid, path)
        self.calls[sid] = call
        if path == PROCESS_PATH and self.servicer is not None:
            if self.server.draining:
                self._end(call, UNAVAILABLE, "the endpoint picker is shutting down")
                return
            call.st = self.servicer.open_stream()
        elif path not in (CHECK_PATH, WATCH_PATH):
            self._end(call, UNIMPLEMENTED, f"unknown method {path.decode('latin-1')}")

    def _data(self, ev: h2.events.DataReceived) -> None:
        sid = ev.stream_id
        if ev.flow_controlled_length:
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.h2.acknowledge_received_data(ev.flow_controlled_length, sid)
        call = self.calls.get(sid)
        if call is None or call.done:
            return
        rx = call.rx
        rx += ev.data
        while len(rx) >= 5:
            size = int.from_bytes(rx[1:5], "big")
            if size > MAX_MESSAGE_BYTES:
                self._end(call, RESOURCE_EXHAUSTED, f"message of {size} bytes exceeds {MAX_MESSAGE_BYTES}")
                return
            if len(rx) < 5 + size:
                break
            if rx[0]:
                self._fail(call, "compressed gRPC messages are not supported")
                return
            raw = bytes(rx[5 : 5 + size])
            del rx[: 5 + size]
            self._message(call, raw)
            if call.done:
                return

    def _message(self, call: _Call, raw: bytes) -> None:
        if call.kind == PROCESS_PATH:
            if call.busy:
                call.inbox.append(raw)
            else:
                self._process(call, raw)
            return
        try:
            req = health_pb2.HealthCheckRequest.FromString(raw)
        except DecodeError:
            self._fail(call, "malformed HealthCheckRequest")
            return
        health = self.server.health
        if call.kind == CHECK_PATH:
            status = health.status.get(req.service)
            if status is None:
                self._end(call, NOT_FOUND, "unknown service")
            else:
                self._send(call, grpc_frame(health_pb2.HealthCheckResponse(status=status)))
                self._end(call, OK)
        else:  # Watch: the status now, then each change
            call.watch = req.service
            health.watchers[(self, call.sid)] = req.service
            self._send(
                call,
                grpc_frame(health_pb2.HealthCheckResponse(status=health.status.get(req.service, _UNKNOWN))),
            )

    def _input_ended(self, call: _Call) -> None:
        """The client half-closed: an ext_proc exchange is over once its queue is answered."""
        if call.kind == PROCESS_PATH and not call.busy and not call.done:
            self._end(call, OK)
        elif call.kind == CHECK_PATH and not call.done:
            self._fail(call, "no HealthCheckRequest")

    # ------------------------------------------------------------------ ext_proc
    def _process(self, call: _Call, raw: bytes) -> None:
        """Handle one ext_proc message: eagerly, or in a task when the servicer must wait."""
        servicer = self.servicer
        assert servicer is not None
        try:
            msg = pb.ProcessingRequest.FromString(raw)
        except DecodeError:
            self._fail(call, "malformed ProcessingRequest")
            return
        coro = servicer.handle(call.st, msg)
        try:
            waiting = coro.send(None)
        except StopIteration as stop:
            self._answer(call, stop.value)
            return
        except StreamFailed as err:
            self._fail(call, str(err))
            return
        call.busy = True
        call.task = self.loop.create_task(self._resume(call, coro, waiting))

    async def _resume(self, call: _Call, coro: Coroutine[Any, Any, Any], waiting: Any) -> None:
        try:
            out = await _Eager(coro, waiting)
        except StreamFailed as err:
            call.busy = False
            self._fail(call, str(err))
            self.flush()
            return
        call.busy = False
        call.task = None
        if call.done:
            return
        self._answer(call, out)
        while call.inbox and not call.busy and not call.done:
            self._process(call, call.inbox.popleft())
        if call.input_ended and not call.busy and not call.done:
            self._end(call, OK)
        self.flush()

    def _answer(self, call: _Call, answers: list[pb.ProcessingResponse]) -> None:
        if call.done:
            return
        if answers:
            self._send(call, b"".join([grpc_frame(a) for a in answers]))
        if call.st.ended:  # the exchange is over: end the call ourselves
            self._end(call, OK)

    # ------------------------------------------------------------------ streams out
    def _send(self, call: _Call, data: bytes) -> None:
        h2c = self.h2
        sid = call.sid
        try:
            if not call.sent_headers:
                h2c.send_headers(sid, _RESPONSE_HEADERS)
                call.sent_headers = True
            if call.pending:
                call.pending += data
                return
            window = h2c.local_flow_control_window(sid)
            frame = h2c.max_outbound_frame_size
            if len(data) <= window and len(data) <= frame:
                h2c.send_data(sid, data)
                return
            call.pending += data
            self._pump(call)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._drop(call)

    def _pump(self, call: _Call) -> None:
        h2c = self.h2
        sid = call.sid
        pending = call.pending
        while pending:
            n = min(len(pending), h2c.local_flow_control_window(sid), h2c.max_outbound_frame_size)
            if n <= 0:
                return
            h2c.send_data(sid, bytes(pending[:n]))
            del pending[:n]
        if call.trailers is not None:
            trailers, call.trailers = call.trailers, None
            h2c.send_headers(sid, trailers, end_stream=True)
            self._closed(call, int(trailers[0][1]))

    def _window_updated(self, sid: int) -> None:
        targets = list(self.calls.values()) if sid == 0 else [self.calls[sid]] if sid in self.calls else []
        for call in targets:
            if call.pending:
                try:
                    self._pump(call)
                except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                    self._drop(call)

    def send_health(self, sid: int, status: int) -> None:
        call = self.calls.get(sid)
        if call is not None and not call.done:
            self._send(call, grpc_frame(health_pb2.HealthCheckResponse(status=status)))
            self.flush()

    def _fail(self, call: _Call, message: str) -> None:
        self._end(call, INTERNAL, message)

    def _end(self, call: _Call, status: int, message: str = "") -> None:
        """End the call with a gRPC status (trailers; a trailers-only response if nothing was sent)."""
        if call.done:
            return
        call.done = True
        trailers: list[tuple[bytes, bytes]] = [(b"grpc-status", str(status).encode())]
        if message:
            trailers.append((b"grpc-message", quote(message, safe=" !#$&'()*+,/:;=?@[]~").encode()))
        try:
            if not call.sent_headers:
                self.h2.send_headers(call.sid, [*_RESPONSE_HEADERS, *trailers], end_stream=True)
                call.sent_headers = True
                self._closed(call, status)
            elif call.pending:
                call.trailers = tuple(trailers)  # after the data the window still holds back
            else:
                self.h2.send_headers(call.sid, _OK_TRAILERS if status == OK else trailers, end_stream=True)
                self._closed(call, status)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._drop(call)

    def _closed(self, call: _Call, status: int) -> None:
        """Our side is finished: forget the call. After an error, a client still sending is
        asked to stop (RST_STREAM NO_ERROR); after OK, its half of the stream ends as it likes
        (later frames on it are acknowledged and ignored)."""
        self._release(call)
        if status != OK and not call.input_ended:
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.h2.reset_stream(call.sid, h2.errors.ErrorCodes.NO_ERROR)

    def _drop(self, call: _Call) -> None:
        """The stream is gone (reset by the client, or the connection lost)."""
        call.done = True
        if call.task is not None and not call.task.done():
            call.task.cancel()
        self._release(call)

    def _release(self, call: _Call) -> None:
        if self.calls.pop(call.sid, None) is None:
            return
        if call.watch is not None:
            self.server.health.watchers.pop((self, call.sid), None)
        if call.st is not None and self.servicer is not None:
            self.servicer.close_stream(call.st)
            call.st = None


class H2Transport:
    """``llmpool.picker.transport.Transport`` on :class:`H2Server`."""

    name = "h2"

    def __init__(
        self,
        servicer: ExtProcServicer,
        host: str,
        port: int,
        health_port: int,
        tls: ssl.SSLContext | None,
    ) -> None:
        self.servicer = servicer
        self.host, self.port, self.health_port, self.tls = host, port, health_port, tls
        self.health = HealthState()
        self.server = H2Server(servicer, self.health)
        self.health_server = H2Server(None, self.health)

    async def start(self) -> None:
        await self.server.start(self.host, self.port, self.tls)
        await self.health_server.start(self.host, self.health_port, None)

    async def set_health(self, service: str, serving: bool) -> None:
        self.health.set(service, serving)

    async def stop(self, grace_s: float) -> None:
        self.server.draining = True  # new streams get UNAVAILABLE
        await self.servicer.drained(grace_s)
        for srv in (self.server, self.health_server):
            srv.close()  # cuts what is still open (health watches, streams past the grace)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(srv.wait_closed(), 5.0)
