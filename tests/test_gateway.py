"""The local Envoy gateway (llmpool.gateway) against the real Envoy 1.40 binary.

A tiny ext_proc servicer in this file plays the picker: it always picks backend B, so a request that
lands on B was steered by the picker, and one that lands on A (the only fallback endpoint) was not.
"""

from __future__ import annotations

import asyncio
import copy
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from aiohttp import ClientSession, web
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmpool import gateway
from llmpool.children import free_port
from llmpool.gateway import (
    DESTINATION_HEADER,
    EXT_PROC_SERVICE,
    LB_NAMESPACE,
    SERVED_KEY,
    EnvoyProcess,
    EnvoySpec,
    GatewayError,
    render_envoy_config,
    validate_config,
    write_config,
)
from llmpool.procs import pid_alive

pytestmark = pytest.mark.timeout(60)

MODES = ("FULL_DUPLEX_STREAMED", "BUFFERED")
BODY = b'{"model": "m", "prompt": "hello"}'


def _spec(**kw: Any) -> EnvoySpec:
    base: dict[str, Any] = {"listen_port": free_port(), "admin_port": free_port(), "epp_port": free_port()}
    base.update(kw)
    return EnvoySpec(**base)


# ------------------------------------------------------------------------------ the fake picker


@dataclass
class FakePicker(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Picks ``target`` for every request; records what Envoy sent (kind, envoy.lb metadata, attributes)."""

    target: str
    mode: str
    seen: list[tuple[str, dict[str, Any], dict[str, Any]]] = field(default_factory=list)

    def _route(self) -> ep.CommonResponse:
        mutation = ep.HeaderMutation(
            set_headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=DESTINATION_HEADER, raw_value=self.target.encode()),
                    append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                )
            ]
        )
        return ep.CommonResponse(header_mutation=mutation, clear_route_cache=True)

    def _metadata(self) -> struct_pb2.Struct:
        md = struct_pb2.Struct()
        md.update({LB_NAMESPACE: {DESTINATION_HEADER: self.target}})
        return md

    async def Process(
        self, requests: AsyncIterator[ep.ProcessingRequest], context: Any
    ) -> AsyncIterator[Any]:
        body = b""
        routed = False
        async for req in requests:
            kind = req.WhichOneof("request")
            meta = json_format.MessageToDict(req.metadata_context).get("filterMetadata", {})
            attrs = json_format.MessageToDict(
                req.attributes.get("envoy.filters.http.ext_proc", struct_pb2.Struct())
            )
            self.seen.append((kind, meta.get(LB_NAMESPACE, {}), attrs))
            if kind == "request_headers":
                if req.request_headers.end_of_stream:  # no body: route in the headers response
                    routed = True
                    yield ep.ProcessingResponse(
                        request_headers=ep.HeadersResponse(response=self._route()),
                        dynamic_metadata=self._metadata(),
                    )
                elif self.mode == "BUFFERED":  # route in the body response
                    yield ep.ProcessingResponse(
                        request_headers=ep.HeadersResponse(response=ep.CommonResponse(clear_route_cache=True))
                    )
            elif kind == "request_body":
                if self.mode == "BUFFERED":
                    yield ep.ProcessingResponse(
                        request_body=ep.BodyResponse(response=self._route()),
                        dynamic_metadata=self._metadata(),
                    )
                    continue
                body += req.request_body.body
                if req.request_body.end_of_stream and not routed:
                    routed = True
                    yield ep.ProcessingResponse(
                        request_headers=ep.HeadersResponse(response=self._route()),
                        dynamic_metadata=self._metadata(),
                    )
                    yield _streamed("request_body", body, True)
            elif kind == "request_trailers":
                yield ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
            elif kind == "response_headers":
                yield ep.ProcessingResponse(response_headers=ep.HeadersResponse())
            elif kind == "response_body":
                yield _streamed("response_body", req.response_body.body, req.response_body.end_of_stream)
            elif kind == "response_trailers":
                yield ep.ProcessingResponse(response_trailers=ep.TrailersResponse())


def _streamed(kind: str, chunk: bytes, eos: bool) -> ep.ProcessingResponse:
    mutation = ep.BodyMutation(streamed_response=ep.StreamedBodyResponse(body=chunk, end_of_stream=eos))
    return ep.ProcessingResponse(
        **{kind: ep.BodyResponse(response=ep.CommonResponse(body_mutation=mutation))}
    )


async def _start_picker(
    picker: FakePicker, port: int, *, health_port: int | None = None, tls: tuple[bytes, bytes] | None = None
) -> grpc.aio.Server:
    server = grpc.aio.server()
    ep_grpc.add_ExternalProcessorServicer_to_server(picker, server)
    if tls is not None:
        server.add_secure_port(f"127.0.0.1:{port}", grpc.ssl_server_credentials([tls]))
    else:
        server.add_insecure_port(f"127.0.0.1:{port}")
    if health_port is not None:
        checker = health.aio.HealthServicer()
        await checker.set(EXT_PROC_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checker, server)
        server.add_insecure_port(f"127.0.0.1:{health_port}")
    await server.start()
    return server


# ---------------------------------------------------------------------------------- backends


@dataclass
class Backends:
    ports: list[int]
    hits: list[tuple[int, str | None]]  # (port that answered, destination header it received)
    runners: list[web.AppRunner]

    def endpoint(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i]}"

    async def close(self) -> None:
        for r in self.runners:
            await r.cleanup()


async def _backends(n: int) -> Backends:
    """n aiohttp servers (aiohttp sets TCP_NODELAY); each answers ``port=P`` and records the hit."""
    b = Backends([], [], [])
    for _ in range(n):
        port = free_port()

        async def handle(req: web.Request, port: int = port) -> web.Response:
            await req.read()
            b.hits.append((port, req.headers.get(DESTINATION_HEADER)))
            return web.Response(text=f"port={port}")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        b.ports.append(port)
        b.runners.append(runner)
    return b


async def _post(session: ClientSession, url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with session.post(url + "/v1/completions", data=BODY, headers=headers or {}) as r:
        return r.status, await r.text()


# ------------------------------------------------------------------------------ render / validate


def test_render_full_duplex_shape() -> None:
    spec = _spec(fallback_endpoints=("127.0.0.1:8000", "[::1]:8001"), epp_health_port=9003)
    cfg = render_envoy_config(spec)
    assert cfg == render_envoy_config(spec)  # pure and deterministic
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert names == [
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.header_to_metadata",
        "envoy.filters.http.router",
    ]
    xp = hcm["http_filters"][0]["typed_config"]
    assert xp["processing_mode"] == {
        "request_header_mode": "SEND",
        "response_header_mode": "SEND",
        "request_body_mode": "FULL_DUPLEX_STREAMED",
        "response_body_mode": "FULL_DUPLEX_STREAMED",
        "request_trailer_mode": "SEND",
        "response_trailer_mode": "SEND",
    }
    assert xp["failure_mode_allow"] is False
    assert xp["metadata_options"]["receiving_namespaces"]["untyped"] == [LB_NAMESPACE]
    assert LB_NAMESPACE in xp["metadata_options"]["forwarding_namespaces"]["untyped"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert routes[0]["match"]["headers"] == [{"name": DESTINATION_HEADER, "present_match": True}]
    assert [r["route"]["cluster"] for r in routes] == ["picked", "fallback"]
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    assert clusters["picked"]["original_dst_lb_config"] == {
        "use_http_header": True,
        "http_header_name": DESTINATION_HEADER,
    }
    epp = clusters["epp"]
    assert epp["health_checks"][0]["grpc_health_check"] == {"service_name": EXT_PROC_SERVICE}
    assert epp["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["health_check_config"] == {
        "port_value": 9003
    }
    fb = clusters["fallback"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["address"] for e in fb] == ["127.0.0.1", "::1"]


def test_render_variants() -> None:
    buffered = render_envoy_config(_spec(body_mode="BUFFERED", failure_mode_allow=True))
    hcm = buffered["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    xp = hcm["http_filters"][0]["typed_config"]
    assert xp["processing_mode"]["request_body_mode"] == "BUFFERED"
    assert xp["processing_mode"]["response_body_mode"] == "NONE"
    assert xp["failure_mode_allow"] is True
    # No fallback endpoints: a request the picker did not route gets a direct 503.
    assert hcm["route_config"]["virtual_hosts"][0]["routes"][-1]["direct_response"]["status"] == 503
    assert "health_checks" not in {c["name"]: c for c in buffered["static_resources"]["clusters"]}["epp"]

    baseline = render_envoy_config(_spec(epp_port=None, fallback_endpoints=("127.0.0.1:8000",)))
    hcm = baseline["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert [f["name"] for f in hcm["http_filters"]] == ["envoy.filters.http.router"]
    assert [c["name"] for c in baseline["static_resources"]["clusters"]] == ["fallback"]

    tls = render_envoy_config(_spec(epp_tls=True, epp_health_port=9003))
    epp = {c["name"]: c for c in tls["static_resources"]["clusters"]}["epp"]
    assert [m["name"] for m in epp["transport_socket_matches"]] == ["health-plaintext", "tls"]

    for bad in (
        {"epp_port": None},  # no picker and nowhere to go
        {"body_mode": "STREAMED"},
        {"fallback_endpoints": ("nohost",)},
        {"fallback_endpoints": "127.0.0.1:80"},
        {"listen_port": 0},
        {"concurrency": 0},
    ):
        with pytest.raises(ValueError):
            _spec(**bad)


@pytest.mark.parametrize(
    "kw",
    [
        {"body_mode": "FULL_DUPLEX_STREAMED"},
        {
            "body_mode": "FULL_DUPLEX_STREAMED",
            "failure_mode_allow": True,
            "fallback_endpoints": ("127.0.0.1:1",),
        },
        {"body_mode": "FULL_DUPLEX_STREAMED", "epp_tls": True, "epp_health_port": 9003},
        {"body_mode": "BUFFERED", "failure_mode_allow": True, "epp_health_port": 9003},
        {"body_mode": "BUFFERED", "epp_tls": True, "fallback_endpoints": ("localhost:8000",)},
        {"epp_port": None, "fallback_endpoints": ("127.0.0.1:8000", "127.0.0.1:8001")},
        {"access_log_path": "/dev/null"},
        {"epp_port": None, "fallback_endpoints": ("127.0.0.1:8000",), "access_log_path": "/dev/null"},
    ],
    ids=[
        "duplex",
        "duplex-failopen",
        "duplex-tls-health",
        "buffered-failopen-health",
        "buffered-tls-dns",
        "no-picker",
        "duplex-access-log",
        "no-picker-access-log",
    ],
)
def test_config_validates_with_envoy(kw: dict[str, Any], tmp_path: Path) -> None:
    spec = _spec(**kw)
    path = write_config(spec, tmp_path)
    assert yaml.safe_load(path.read_text()) == render_envoy_config(spec)
    validate_config(path)


def test_access_log_is_opt_in_and_names_its_fields() -> None:
    def hcm(spec: EnvoySpec) -> dict[str, Any]:
        listener = render_envoy_config(spec)["static_resources"]["listeners"][0]
        return listener["filter_chains"][0]["filters"][0]["typed_config"]  # type: ignore[no-any-return]

    assert "access_log" not in hcm(_spec())
    (log,) = hcm(_spec(access_log_path="/var/log/gw.json"))["access_log"]
    assert log["typed_config"]["path"] == "/var/log/gw.json"
    fmt = log["typed_config"]["log_format"]["json_format"]
    assert fmt == gateway.ACCESS_LOG_FORMAT
    assert fmt["ext_proc"] == f"%FILTER_STATE({gateway.EXT_PROC_FILTER}:TYPED)%"
    assert fmt["upstream_first_byte_us"] == "%COMMON_DURATION(DS_RX_BEG:US_RX_BEG:us)%"
    with pytest.raises(ValueError, match="access_log_path"):
        _spec(access_log_path=" ")


def test_full_duplex_needs_trailers_send(tmp_path: Path) -> None:
    """Envoy 1.40 refuses FULL_DUPLEX_STREAMED bodies unless the matching trailer mode is SEND."""
    cfg = copy.deepcopy(render_envoy_config(_spec()))
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"][0]["typed_config"]["processing_mode"]["request_trailer_mode"] = "SKIP"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(GatewayError, match="request_trailer_mode has to be set to SEND"):
        validate_config(path)


# ---------------------------------------------------------------------------------- lifecycle


def test_two_envoys_start_stats_and_stop() -> None:
    specs = [_spec(epp_port=None, fallback_endpoints=("127.0.0.1:1",)) for _ in range(2)]
    with EnvoyProcess(specs[0]) as a, EnvoyProcess(specs[1]) as b:
        assert a.running() and b.running() and a.pid != b.pid
        for gw in (a, b):
            assert gw.admin_get("/ready") == (200, "LIVE\n")
            stats = gw.stats("cluster.fallback.")
            assert stats["cluster.fallback.membership_total"] == 1
        workdir = a.workdir
        assert workdir is not None and (workdir / "envoy.yaml").is_file()
    assert not a.running() and not b.running()
    assert workdir is not None and not workdir.exists()  # temp dir removed
    assert a.stop() is None  # idempotent


def test_start_failure_reports_the_log(tmp_path: Path) -> None:
    spec = _spec(epp_port=None, fallback_endpoints=("127.0.0.1:1",))
    with EnvoyProcess(spec), pytest.raises(GatewayError, match="envoy"):
        # Same admin and listener ports: the second Envoy cannot bind and exits.
        EnvoyProcess(spec, workdir=tmp_path, ready_timeout_s=5).start()


# ------------------------------------------------------------------------------- data path


def test_no_picker_round_robins_over_the_pool() -> None:
    async def main() -> None:
        b = await _backends(2)
        spec = _spec(epp_port=None, fallback_endpoints=(b.endpoint(0), b.endpoint(1)))
        try:
            async with EnvoyProcess(spec) as gw, ClientSession() as s:
                for _ in range(4):
                    status, _text = await _post(s, gw.url)
                    assert status == 200
        finally:
            await b.close()
        assert sorted(p for p, _ in b.hits) == sorted(b.ports * 2)

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_picker_steers_and_sees_the_served_endpoint(mode: str) -> None:
    async def main() -> None:
        b = await _backends(2)
        picker = FakePicker(b.endpoint(1), mode)
        spec = _spec(body_mode=mode, fallback_endpoints=(b.endpoint(0),))
        assert spec.epp_port is not None
        server = await _start_picker(picker, spec.epp_port)
        try:
            async with EnvoyProcess(spec) as gw, ClientSession() as s:
                # A client-chosen destination is stripped before routing and before the picker.
                for headers in ({}, {DESTINATION_HEADER: b.endpoint(0)}):
                    assert await _post(s, gw.url, headers) == (200, f"port={b.ports[1]}")
                async with s.get(gw.url + "/v1/models") as r:  # headers-only request
                    assert r.status == 200
                stats = gw.ext_proc_stats()
        finally:
            await server.stop(0)
            await b.close()
        assert b.hits == [(b.ports[1], b.endpoint(1))] * 3
        assert stats["streams_started"] == 3 and stats["streams_failed"] == 0
        kinds = [k for k, _, _ in picker.seen]
        assert kinds.count("request_headers") == 3 and kinds.count("response_headers") == 3
        if mode == "FULL_DUPLEX_STREAMED":
            assert "response_body" in kinds
        else:
            assert "response_body" not in kinds
        for kind, lb, attrs in picker.seen:
            assert DESTINATION_HEADER not in (lb if kind.startswith("request") else {})
            if kind == "response_headers":
                # The gateway reports what it did: the picker's choice and the endpoint that served.
                assert lb == {DESTINATION_HEADER: b.endpoint(1), SERVED_KEY: b.endpoint(1)}
                assert attrs == {"upstream.address": b.endpoint(1)}

    asyncio.run(main())


def _picker_down(*, fallback: bool, n: int = 3, **kw: Any) -> tuple[list[int], list[int], dict[str, int]]:
    """n POSTs through a gateway whose picker is not running.

    Returns (statuses, backend ports hit, ext_proc stats)."""

    async def main() -> tuple[list[int], list[int], dict[str, int]]:
        b = await _backends(1)
        spec = _spec(fallback_endpoints=(b.endpoint(0),) if fallback else (), **kw)
        codes: list[int] = []
        try:
            async with EnvoyProcess(spec) as gw:
                async with ClientSession() as s:
                    for _ in range(n):
                        codes.append((await _post(s, gw.url))[0])
                stats = gw.ext_proc_stats()
        finally:
            await b.close()
        return codes, [p for p, _ in b.hits], stats

    return asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_fail_close_with_picker_down_is_500(mode: str) -> None:
    codes, hits, stats = _picker_down(fallback=True, body_mode=mode)
    assert codes == [500, 500, 500] and hits == []
    assert stats["failure_mode_allowed"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_fail_open_with_picker_down_reaches_the_pool(mode: str) -> None:
    # With a health check of the (absent) picker the stream fails at set-up, so even the first
    # FULL_DUPLEX_STREAMED request fails open.
    codes, hits, stats = _picker_down(
        fallback=True, body_mode=mode, failure_mode_allow=True, epp_health_port=free_port()
    )
    assert codes == [200, 200, 200] and len(hits) == 3
    assert stats["failure_mode_allowed"] == 3


def test_fail_open_without_health_check_after_the_first_failure() -> None:
    """FULL_DUPLEX_STREAMED can only fail open before a body chunk went to the picker: the first request
    after the picker died gets 500, outlier detection then ejects the picker and the rest fail open."""
    codes, hits, _ = _picker_down(fallback=True, n=4, failure_mode_allow=True)
    # The first is 500 when its body reached Envoy together with the headers (the usual case here).
    assert codes[0] in (500, 200) and codes[1:] == [200, 200, 200]
    assert len(hits) == 3 + (codes[0] == 200)


def test_fail_open_without_fallback_is_503() -> None:
    codes, hits, _ = _picker_down(fallback=False, n=2, body_mode="BUFFERED", failure_mode_allow=True)
    assert codes == [503, 503] and hits == []


def test_comma_separated_destination_is_not_understood_by_envoy() -> None:
    """Plain Envoy's ORIGINAL_DST takes one ip:port: a fallback list in the header gives 503."""

    async def main() -> None:
        b = await _backends(2)
        spec = _spec(body_mode="BUFFERED")
        assert spec.epp_port is not None
        server = await _start_picker(
            FakePicker(f"{b.endpoint(1)},{b.endpoint(0)}", "BUFFERED"), spec.epp_port
        )
        try:
            async with EnvoyProcess(spec) as gw, ClientSession() as s:
                status, _ = await _post(s, gw.url)
        finally:
            await server.stop(0)
            await b.close()
        assert status == 503 and b.hits == []

    asyncio.run(main())


def test_health_checked_tls_picker_fails_open_and_recovers(tmp_path: Path) -> None:
    """TLS to a self-signed picker (not verified), plaintext health port; the picker dies and comes back."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not found (needed to make a self-signed certificate)")

    async def main(tmp: Path) -> None:
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=picker",
             "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem")],
            check=True, capture_output=True,
        )  # fmt: skip
        tls = ((tmp / "key.pem").read_bytes(), (tmp / "cert.pem").read_bytes())
        b = await _backends(2)
        spec = _spec(
            epp_tls=True,
            epp_health_port=free_port(),
            failure_mode_allow=True,
            fallback_endpoints=(b.endpoint(0),),
            health_check_interval_s=0.2,
        )
        assert spec.epp_port is not None and spec.epp_health_port is not None
        picker = FakePicker(b.endpoint(1), "FULL_DUPLEX_STREAMED")
        server = await _start_picker(picker, spec.epp_port, health_port=spec.epp_health_port, tls=tls)
        try:
            async with EnvoyProcess(spec) as gw, ClientSession() as s:
                assert await _post(s, gw.url) == (
                    200,
                    f"port={b.ports[1]}",
                )  # LIVE waited for the health check
                await server.stop(0)
                deadline = time.monotonic() + 5
                while (await _post(s, gw.url))[1] != f"port={b.ports[0]}":
                    assert time.monotonic() < deadline, "never failed open"
                    await asyncio.sleep(0.05)
                assert "failed" in gw.host_health()[f"127.0.0.1:{spec.epp_port}"]
                server = await _start_picker(picker, spec.epp_port, health_port=spec.epp_health_port, tls=tls)
                await asyncio.to_thread(gw.wait_epp_healthy, 5.0)
                # Healthy in the admin view = routable at once (update_merge_window is 0).
                assert await _post(s, gw.url) == (200, f"port={b.ports[1]}")
        finally:
            await server.stop(0)
            await b.close()

    asyncio.run(main(tmp_path))


def test_envoy_binary_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMPOOL_ENVOY", "/no/such/envoy")
    assert gateway.envoy_binary() == "/no/such/envoy"


def test_envoy_dies_with_the_process_that_started_it() -> None:
    """A test process killed with SIGKILL does not leave its Envoy running (PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("parent-death signal is Linux only")
    script = (
        "import time\n"
        "from llmpool.children import free_port\nfrom llmpool.gateway import EnvoyProcess, EnvoySpec\n"
        "spec = EnvoySpec(listen_port=free_port(), admin_port=free_port(), epp_port=None,\n"
        "                 fallback_endpoints=('127.0.0.1:1',))\n"
        "gw = EnvoyProcess(spec).start()\n"
        "print(gw.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert pid_alive(pid)
        parent.kill()
        parent.wait(timeout=5)
        deadline = time.monotonic() + 5
        while pid_alive(pid):
            assert time.monotonic() < deadline, f"envoy {pid} outlived its parent"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
