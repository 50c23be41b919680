"""The transport floor: an ext_proc server that only answers, for ``llmpool picker-bench --floor``.

It speaks the same full-duplex exchange as the picker (the routing answer with a fixed
destination once the body ends, every other message passed back) over the same transports,
but parses nothing and runs no policy. What it adds behind Envoy is what the transport and
Envoy's ext_proc filter cost by themselves; the picker's numbers minus these are the
picker's own. Run: ``python -m llmpool.picker.floor --port P --health-port H --destination D
--transport grpclib``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from llmpool.aio import EVENT_LOOPS, run
from llmpool.picker import TRANSPORTS, protocol
from llmpool.picker.servicer import ExtProcServicer, StreamState
from llmpool.picker.transport import Listen, make_transport


class FloorServicer(ExtProcServicer):
    """Answers every message with the least the protocol allows (see the module docstring)."""

    def __init__(self, destination: str) -> None:  # no director: nothing is routed
        self.destination = destination
        self.open_streams = 0

    async def handle(self, st: StreamState, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        kind = msg.WhichOneof("request")
        if kind == "request_body":
            st.body.append(msg.request_body.body)
            if msg.request_body.end_of_stream:
                raw = b"".join(st.body)
                hdrs = {"content-length": str(len(raw))}
                return [
                    protocol.routed_headers_response(self.destination, hdrs),
                    protocol.streamed_body(raw, end=True, request=True),
                ]
        elif kind == "response_headers":
            return [protocol.plain_headers_response(request=False)]
        elif kind == "response_body":
            rb = msg.response_body
            st.ended = rb.end_of_stream
            return [protocol.streamed_body(rb.body, end=rb.end_of_stream, request=False)]
        elif kind in ("request_trailers", "response_trailers"):
            return [protocol.trailers_response(request=kind == "request_trailers")]
        return []

    def close_stream(self, st: StreamState) -> None:
        self.open_streams -= 1


async def serve(port: int, health_port: int, destination: str, transport: str) -> None:
    t = make_transport(transport, FloorServicer(destination), Listen("127.0.0.1", port, health_port))
    await t.start()
    for name in ("liveness", "readiness", "", "envoy.service.ext_proc.v3.ExternalProcessor"):
        await t.set_health(name, True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await t.stop(0.5)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m llmpool.picker.floor", description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--health-port", type=int, required=True)
    p.add_argument("--destination", required=True, help="ip:port every request is routed to")
    p.add_argument("--transport", choices=TRANSPORTS, default=TRANSPORTS[0])
    p.add_argument("--event-loop", choices=EVENT_LOOPS, default="auto")
    a = p.parse_args(argv)
    run(serve(a.port, a.health_port, a.destination, a.transport), a.event_loop)


if __name__ == "__main__":
    main()
