"""The picker's gRPC transports: the ext_proc service and gRPC health, on two ports.

All serve the same :class:`~llmpool.picker.servicer.ExtProcServicer` and the same health
states:

* ``h2`` (the default; :mod:`llmpool.picker.h2transport`): our own gRPC on the ``h2`` library.
  Each message is answered eagerly inside the socket read that brought it, one socket write
  per read: through Envoy ~0.1 ms less added latency than ``grpclib`` and 40-50 % more
  requests per core for the policies (docs/benchmarks.md);
* ``grpclib``: gRPC over the same ``h2`` library on the picker's own asyncio loop, a task per
  stream and an asyncio queue per message (the stream as an async iterator: ``process``);
* ``grpcio``: ``grpc.aio``, gRPC's C core. Its completion queue is polled in a thread of its
  own and every message crosses to the event loop (~0.4 ms per round trip here).

The ext_proc port also serves gRPC health (Envoy's health checks ask there); the health port
serves health only. :meth:`Transport.stop` refuses new streams, lets open ones finish for up
to ``grace_s`` and then cuts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import h2.connection
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server

from llmpool.picker import TRANSPORTS
from llmpool.picker.servicer import ExtProcServicer, StreamFailed

log = logging.getLogger("llmpool.picker")

PROCESS_METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
CLOSED_STREAMS_REMEMBERED = 4096
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Transport(Protocol):
    """What :class:`~llmpool.picker.server.PickerServer` needs of a transport."""

    name: str

    async def start(self) -> None: ...

    async def set_health(self, service: str, serving: bool) -> None: ...

    async def stop(self, grace_s: float) -> None: ...


@dataclass(frozen=True, slots=True)
class Listen:
    """Where a transport listens: ext_proc (and health) on ``port``, health only on
    ``health_port``; ``tls`` = (certificate PEM, key PEM) for ``port``, or None (plaintext)."""

    host: str
    port: int
    health_port: int
    tls: tuple[bytes, bytes] | None = None


def make_transport(name: str, servicer: ExtProcServicer, listen: Listen) -> Transport:
    if name == "grpclib":
        return GrpclibTransport(servicer, listen)
    if name == "grpcio":
        return GrpcioTransport(servicer, listen)
    if name == "h2":
        from llmpool.picker.h2transport import H2Transport

        tls = None if listen.tls is None else _ssl_context(listen.tls)
        return H2Transport(servicer, listen.host, listen.port, listen.health_port, tls)
    raise ValueError(f"unknown transport {name!r}: choose one of {', '.join(TRANSPORTS)}")


# --------------------------------------------------------------------------------- grpcio
class GrpcioTransport:
    name = "grpcio"

    def __init__(self, servicer: ExtProcServicer, listen: Listen) -> None:
        host, port, health_port, tls = listen.host, listen.port, listen.health_port, listen.tls
        self.health = health_aio.HealthServicer()
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_ExternalProcessorServicer_to_server(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        addr = f"{host}:{port}"
        if tls is None:
            self.server.add_insecure_port(addr)
        else:
            cert, key = tls
            self.server.add_secure_port(addr, grpc.ssl_server_credentials([(key, cert)]))
        self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        self.health_server.add_insecure_port(f"{host}:{health_port}")

    async def start(self) -> None:
        await self.server.start()
        await self.health_server.start()

    async def set_health(self, service: str, serving: bool) -> None:
        await self.health.set(service, _SERVING if serving else _NOT_SERVING)

    async def stop(self, grace_s: float) -> None:
        await self.server.stop(grace_s)
        await self.health_server.stop(0)


# -------------------------------------------------------------------------------- grpclib
class _Health:
    """``grpc.health.v1.Health`` for grpclib: Check, and Watch (the status now, then each change)."""

    def __init__(self) -> None:
        self.status: dict[str, int] = {}
        self._changed = asyncio.Condition()

    async def set(self, service: str, serving: bool) -> None:
        async with self._changed:
            self.status[service] = _SERVING if serving else _NOT_SERVING
            self._changed.notify_all()

    async def check(self, stream: Any) -> None:
        req = await stream.recv_message()
        status = self.status.get(req.service if req is not None else "")
        if status is None:
            raise GRPCError(Status.NOT_FOUND, "unknown service")
        await stream.send_message(health_pb2.HealthCheckResponse(status=status))

    async def watch(self, stream: Any) -> None:
        req = await stream.recv_message()
        name = req.service if req is not None else ""
        last: int | None = None
        while True:
            async with self._changed:
                now = self.status.get(name, _UNKNOWN)
                if now == last:
                    await self._changed.wait()
                    continue
            last = now
            await stream.send_message(health_pb2.HealthCheckResponse(status=now))

    def __mapping__(self) -> dict[str, Any]:
        req, resp = health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
        return {
            "/grpc.health.v1.Health/Check": Handler(self.check, Cardinality.UNARY_UNARY, req, resp),
            "/grpc.health.v1.Health/Watch": Handler(self.watch, Cardinality.UNARY_STREAM, req, resp),
        }


class _ExtProc:
    """``envoy.service.ext_proc.v3.ExternalProcessor`` for grpclib."""

    def __init__(self, servicer: ExtProcServicer) -> None:
        self.servicer = servicer
        self.draining = False

    async def process(self, stream: Any) -> None:
        if self.draining:
            raise GRPCError(Status.UNAVAILABLE, "the endpoint picker is shutting down")
        messages: AsyncIterator[pb.ProcessingRequest] = stream.__aiter__()
        try:
            async for out in self.servicer.process(messages):
                await stream.send_message(out)
        except StreamFailed as err:
            raise GRPCError(Status.INTERNAL, str(err)) from None

    def __mapping__(self) -> dict[str, Any]:
        return {
            PROCESS_METHOD: Handler(
                self.process, Cardinality.STREAM_STREAM, pb.ProcessingRequest, pb.ProcessingResponse
            )
        }


def _ssl_context(tls: tuple[bytes, bytes]) -> ssl.SSLContext:
    """A server context from PEM bytes (``ssl`` loads chains from files only: a private temp
    directory holds them for the call)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    with tempfile.TemporaryDirectory(prefix="llmpool-tls-") as d:
        cert, key = Path(d) / "tls.crt", Path(d) / "tls.key"
        cert.write_bytes(tls[0])
        key.touch(mode=0o600)
        key.write_bytes(tls[1])
        ctx.load_cert_chain(cert, key)
    return ctx


class GrpclibTransport:
    name = "grpclib"

    def __init__(self, servicer: ExtProcServicer, listen: Listen) -> None:
        # h2 remembers the ids of the last 65,536 closed streams of a connection, to answer late
        # frames for them correctly: ~10 MiB per gateway connection, a slow RSS climb over the
        # first 65k requests. A few thousand cover any late frame (read when a connection opens).
        h2.connection.H2Connection.MAX_CLOSED_STREAMS = CLOSED_STREAMS_REMEMBERED
        # grpclib logs every stream its client cancels at INFO; Envoy cancels streams routinely.
        logging.getLogger("grpclib").setLevel(max(logging.WARNING, logging.getLogger("grpclib").level))
        self.servicer = servicer
        self.listen = listen
        self.ssl = None if listen.tls is None else _ssl_context(listen.tls)
        self.health = _Health()
        self.ext_proc = _ExtProc(servicer)
        self.server = Server([self.ext_proc, self.health])
        self.health_server = Server([self.health])

    async def start(self) -> None:
        at = self.listen
        await self.server.start(at.host, at.port, ssl=self.ssl, reuse_address=True)
        await self.health_server.start(at.host, at.health_port, reuse_address=True)

    async def set_health(self, service: str, serving: bool) -> None:
        await self.health.set(service, serving)

    async def stop(self, grace_s: float) -> None:
        self.ext_proc.draining = True  # new streams get UNAVAILABLE
        await self.servicer.drained(grace_s)
        for srv in (self.server, self.health_server):
            with contextlib.suppress(RuntimeError, TimeoutError):  # RuntimeError: never started
                srv.close()  # cancels what is still open (health watches, streams past the grace)
                await asyncio.wait_for(srv.wait_closed(), 5.0)
