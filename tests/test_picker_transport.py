"""The picker's two gRPC transports keep one contract: ext_proc streams answered, gRPC health
(Check and Watch) on both ports, INTERNAL for a failing stream, and a drain that refuses new
streams while open ones finish. A real gRPC client (grpc.aio) talks to each over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import grpc
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmpool.aio import run
from llmpool.children import free_port
from llmpool.picker import TRANSPORTS
from llmpool.picker.config import PickerConfig
from llmpool.picker.director import Director
from llmpool.picker.metrics import PickerMetrics
from llmpool.picker.server import self_signed_credentials
from llmpool.picker.servicer import ExtProcServicer
from llmpool.picker.transport import PROCESS_METHOD, Listen, make_transport
from llmpool.routing.policy import PolicyConfig
from llmpool.serving.datastore import Datastore, Endpoint
from llmpool.serving.scrape import EngineMetrics, ServerMetrics

BODY = orjson.dumps({"model": "m", "prompt": "hello " * 50, "max_tokens": 4})
OTHER_BODY = orjson.dumps({"model": "m", "prompt": "another request", "max_tokens": 4})
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _servicer() -> ExtProcServicer:
    ds = Datastore([Endpoint.parse("10.0.0.1:8000"), Endpoint.parse("10.0.0.2:8000")])
    for i in range(2):
        ds.scraped(i, ServerMetrics(engines={"0": EngineMetrics(0, 0, 0.1, 16, 1000)}), now=0.0)
    return ExtProcServicer(
        Director(PickerConfig(policy=PolicyConfig(name="round-robin")), ds, PickerMetrics())
    )


def _headers() -> pb.ProcessingRequest:
    h = {":method": "POST", ":path": "/v1/completions", "content-type": "application/json"}
    values = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in h.items()]
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=values)))


def _body(data: bytes, end: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=end))


class _Running:
    def __init__(self, name: str, tls: bool = False) -> None:
        self.servicer = _servicer()
        self.port, self.health_port = free_port(), free_port()
        self.creds = self_signed_credentials() if tls else None
        self.t = make_transport(
            name, self.servicer, Listen("127.0.0.1", self.port, self.health_port, self.creds)
        )

    def channel(self, health_port: bool = False) -> grpc.aio.Channel:
        if health_port or self.creds is None:
            return grpc.aio.insecure_channel(f"127.0.0.1:{self.health_port if health_port else self.port}")
        return grpc.aio.secure_channel(
            f"127.0.0.1:{self.port}",
            grpc.ssl_channel_credentials(root_certificates=self.creds[0]),
            options=[("grpc.ssl_target_name_override", "localhost")],
        )


async def _exchange(ch: grpc.aio.Channel, body: bytes = BODY) -> list[pb.ProcessingResponse]:
    call = pb_grpc.ExternalProcessorStub(ch).Process()
    await call.write(_headers())
    await call.write(_body(body))
    out = [await call.read(), await call.read()]
    await call.done_writing()
    return out


@pytest.mark.parametrize("name", TRANSPORTS)
@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
@pytest.mark.parametrize("loop", ["asyncio", "auto"])
def test_exchange_and_health_on_both_ports(name: str, tls: bool, loop: str) -> None:
    async def main() -> None:
        r = _Running(name, tls=tls)
        await r.t.start()
        try:
            await r.t.set_health("liveness", True)
            await r.t.set_health("readiness", False)
            async with r.channel() as ch, r.channel(health_port=True) as hch:
                for c in (ch, hch):
                    stub = health_pb2_grpc.HealthStub(c)
                    live = await stub.Check(health_pb2.HealthCheckRequest(service="liveness"))
                    assert live.status == SERVING
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await stub.Check(health_pb2.HealthCheckRequest(service="no-such-service"))
                    assert err.value.code() == grpc.StatusCode.NOT_FOUND
                watch = health_pb2_grpc.HealthStub(hch).Watch(
                    health_pb2.HealthCheckRequest(service="readiness")
                )
                assert (await watch.read()).status == NOT_SERVING
                await r.t.set_health("readiness", True)
                assert (await asyncio.wait_for(watch.read(), 5)).status == SERVING
                watch.cancel()
                out = await _exchange(ch)
                assert out[0].HasField("request_headers") and out[1].HasField("request_body")
                assert out[1].request_body.response.body_mutation.streamed_response.body == BODY
        finally:
            await r.t.stop(0.5)

    run(main(), loop)  # auto: uvloop where it is installed (the picker's default)


@pytest.mark.parametrize("name", TRANSPORTS)
def test_a_failing_stream_ends_with_internal(name: str, monkeypatch: Any) -> None:
    async def main() -> None:
        r = _Running(name)

        async def boom(*_: Any) -> Any:
            raise RuntimeError("boom")

        monkeypatch.setattr(r.servicer.director, "route", boom)
        await r.t.start()
        try:
            async with r.channel() as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _exchange(ch)
                assert err.value.code() == grpc.StatusCode.INTERNAL
                assert "RuntimeError" in (err.value.details() or "")
            assert r.servicer.open_streams == 0
        finally:
            await r.t.stop(0.5)

    asyncio.run(main())


@pytest.mark.parametrize("name", TRANSPORTS)
def test_drain_refuses_new_streams_and_lets_open_ones_finish(name: str) -> None:
    async def main() -> None:
        r = _Running(name)
        await r.t.start()
        async with r.channel() as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)
            open_call = stub.Process()
            await open_call.write(_headers())
            await open_call.write(_body(BODY[:10], end=False))  # mid-body: the stream stays open
            await _open_streams_become(r, 1)
            stopping = asyncio.create_task(r.t.stop(5.0))
            await asyncio.sleep(0.3)
            assert not stopping.done()  # waiting for the open stream
            late = stub.Process()
            with contextlib.suppress(grpc.aio.AioRpcError):  # refused at once: nothing to read
                await late.read()
            assert await asyncio.wait_for(late.code(), 5) == grpc.StatusCode.UNAVAILABLE
            await open_call.write(_body(BODY[10:]))  # the open one finishes
            assert (await open_call.read()).HasField("request_headers")
            assert (await open_call.read()).HasField("request_body")
            await open_call.done_writing()
            await asyncio.wait_for(stopping, 6)

    asyncio.run(main())


def test_unknown_transport_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown transport .h3.: choose one of h2, grpclib, grpcio"):
        make_transport("h3", _servicer(), Listen("127.0.0.1", 1, 2))


def test_a_taken_port_is_an_os_error_and_stop_still_works() -> None:
    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            t = make_transport("grpclib", _servicer(), Listen("127.0.0.1", port, free_port()))
            with pytest.raises(OSError):
                await t.start()
            await t.stop(0)  # what the server's shutdown path does: no second error

    asyncio.run(main())


def _response_headers() -> pb.ProcessingRequest:
    values = [base_pb2.HeaderValue(key=":status", raw_value=b"200")]
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=values)))


@pytest.mark.parametrize("name", TRANSPORTS)
def test_a_message_that_waits_keeps_the_streams_answers_in_order(name: str, monkeypatch: Any) -> None:
    """Routing that waits (a request held at the router) finishes in a task; the messages that
    arrive meanwhile are answered after it, in order, and other streams are not held up."""

    async def main() -> None:
        r = _Running(name)
        route = r.servicer.director.route
        gate = asyncio.Event()

        async def held(headers: Any, body: bytes, subset: Any) -> Any:
            if body == BODY:
                await gate.wait()
            return await route(headers, body, subset)

        monkeypatch.setattr(r.servicer.director, "route", held)
        await r.t.start()
        try:
            async with r.channel() as ch:
                stub = pb_grpc.ExternalProcessorStub(ch)
                slow = stub.Process()
                await slow.write(_headers())
                await slow.write(_body(BODY))
                await slow.write(_response_headers())  # queued behind the held routing
                other = await asyncio.wait_for(_exchange(ch, OTHER_BODY), 5)
                assert other[0].HasField("request_headers")  # not held up by the first stream
                gate.set()
                kinds = [(await asyncio.wait_for(slow.read(), 5)).WhichOneof("response") for _ in range(3)]
                assert kinds == ["request_headers", "request_body", "response_headers"]
                await slow.done_writing()
            await _open_streams_become(r, 0)
            assert r.servicer.director.ds.inflight_total() == 0
        finally:
            await r.t.stop(0.5)

    asyncio.run(main())


@pytest.mark.parametrize("name", TRANSPORTS)
def test_a_client_gone_while_its_request_waits_releases_it(name: str, monkeypatch: Any) -> None:
    async def main() -> None:
        r = _Running(name)
        started = asyncio.Event()

        async def never(*_: Any) -> Any:
            started.set()
            await asyncio.Event().wait()

        monkeypatch.setattr(r.servicer.director, "route", never)
        await r.t.start()
        try:
            async with r.channel() as ch:
                call = pb_grpc.ExternalProcessorStub(ch).Process()
                await call.write(_headers())
                await call.write(_body(BODY))
                await asyncio.wait_for(started.wait(), 5)
                assert r.servicer.open_streams == 1
                call.cancel()
                await _open_streams_become(r, 0)
        finally:
            await r.t.stop(0.5)

    asyncio.run(main())


@pytest.mark.parametrize("name", TRANSPORTS)
def test_an_unknown_method_is_unimplemented(name: str) -> None:
    async def main() -> None:
        r = _Running(name)
        await r.t.start()
        try:
            async with r.channel() as ch, r.channel(health_port=True) as hch:
                for c, method in ((ch, "/no.Such/Method"), (hch, PROCESS_METHOD)):
                    call = c.unary_unary(method, request_serializer=None, response_deserializer=None)
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call(b"")
                    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, method
        finally:
            await r.t.stop(0.5)

    asyncio.run(main())


@pytest.mark.parametrize("name", TRANSPORTS)
def test_a_large_body_comes_back_whole_in_chunks(name: str) -> None:
    """A 600 KB body sent in pieces is answered in order, in chunks of at most 62,000 bytes
    (each more than one HTTP/2 frame). Flow control: the next test."""
    big = orjson.dumps({"model": "m", "prompt": " ".join(f"w{i}" for i in range(100_000)), "max_tokens": 4})

    async def main() -> None:
        r = _Running(name)
        await r.t.start()
        try:
            async with r.channel() as ch:
                call = pb_grpc.ExternalProcessorStub(ch).Process()
                await call.write(_headers())
                for i in range(0, len(big), 50_000):  # Envoy streams a body in pieces
                    await call.write(_body(big[i : i + 50_000], end=i + 50_000 >= len(big)))
                assert (await asyncio.wait_for(call.read(), 5)).HasField("request_headers")
                got = b""
                while True:
                    out = await asyncio.wait_for(call.read(), 5)
                    sr = out.request_body.response.body_mutation.streamed_response
                    assert len(sr.body) <= 62_000
                    got += sr.body
                    if sr.end_of_stream:
                        break
                assert got == big
                await call.done_writing()
        finally:
            await r.t.stop(0.5)

    asyncio.run(main())


def test_h2_waits_for_the_clients_flow_control_window() -> None:
    """A client that opens only 1,000 bytes of window per stream still gets the whole answer:
    the h2 transport holds what does not fit and sends it as the client's updates arrive."""
    import h2.events

    from llmpool.picker.h2transport import grpc_frame

    body = orjson.dumps({"model": "m", "prompt": "many words " * 600, "max_tokens": 4})
    assert len(body) > 5_000

    async def main() -> None:
        r = _Running("h2")
        await r.t.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
        try:
            c, sid = _raw_process_stream(window=1_000)
            c.send_data(sid, grpc_frame(_headers()) + grpc_frame(_body(body)))
            writer.write(c.data_to_send())
            data = bytearray()
            while len(_frames(bytes(data))) < 2:  # the routing answer and the whole body
                chunk = await asyncio.wait_for(reader.read(65_536), 5)
                assert chunk, "the picker closed the connection"
                for ev in c.receive_data(chunk):
                    if isinstance(ev, h2.events.DataReceived):
                        data += ev.data
                        c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                writer.write(c.data_to_send())
        except TimeoutError:
            pytest.fail("the answer stalled: the transport did not resume after the window updates")
        finally:
            writer.close()
            await r.t.stop(0.5)
        msgs = [pb.ProcessingResponse.FromString(m) for m in _frames(bytes(data))]
        assert msgs[0].HasField("request_headers")
        assert msgs[1].request_body.response.body_mutation.streamed_response.body == body

    asyncio.run(main())


def _frames(data: bytes) -> list[bytes]:
    """The whole gRPC messages at the start of ``data``."""
    out = []
    while len(data) >= 5:
        n = int.from_bytes(data[1:5], "big")
        if len(data) < 5 + n:
            break
        out.append(data[5 : 5 + n])
        data = data[5 + n :]
    return out


@pytest.mark.parametrize(
    ("prefix", "code", "needle"),
    [
        (b"\x01" + (10).to_bytes(4, "big") + b"x" * 10, b"13", b"compressed"),
        (b"\x00" + (2**31).to_bytes(4, "big"), b"8", b"exceeds"),
    ],
    ids=["compressed", "too-large"],
)
def test_h2_refuses_a_compressed_or_oversized_message(prefix: bytes, code: bytes, needle: bytes) -> None:
    """A compressed message fails its stream with INTERNAL, a length prefix past the limit with
    RESOURCE_EXHAUSTED before anything is buffered; the stream's state is released."""
    import h2.events

    async def main() -> None:
        r = _Running("h2")
        await r.t.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
        try:
            c, sid = _raw_process_stream()
            c.send_data(sid, prefix)
            writer.write(c.data_to_send())
            trailers: dict[bytes, bytes] = {}
            while not trailers:
                chunk = await asyncio.wait_for(reader.read(65_536), 5)
                assert chunk
                for ev in c.receive_data(chunk):
                    if isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived):
                        got = dict(ev.headers)
                        if b"grpc-status" in got:
                            trailers = got
                writer.write(c.data_to_send())
            assert trailers[b"grpc-status"] == code
            assert needle in trailers.get(b"grpc-message", b"")
            assert r.servicer.open_streams == 0
        finally:
            writer.close()
            await r.t.stop(0.5)

    asyncio.run(main())


async def _open_streams_become(r: _Running, n: int) -> None:
    for _ in range(100):
        if r.servicer.open_streams == n:
            break
        await asyncio.sleep(0.02)
    assert r.servicer.open_streams == n


def _raw_process_stream(window: int | None = None) -> tuple[Any, int]:
    """An HTTP/2 client connection (the ``h2`` library, no gRPC stack) with an ext_proc call
    opened on it (headers only; the caller sends its bytes); ``window``: the client's
    initial stream window."""
    import h2.config
    import h2.connection
    import h2.settings

    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    c.initiate_connection()
    if window is not None:
        c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, [(b":method", b"POST"), (b":path", PROCESS_METHOD.encode()),
                         (b":scheme", b"http"), (b":authority", b"picker"),
                         (b"content-type", b"application/grpc"), (b"te", b"trailers")])  # fmt: skip
    return c, sid
