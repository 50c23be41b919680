"""The endpoint picker process: wiring of the ext_proc server, health, metrics, endpoint
discovery, metrics collection and config hot reload (``llmpool extender``).

Ports (the reference picker's defaults): ext_proc gRPC 9002 (TLS with a self-signed
certificate unless ``--plaintext`` or ``--cert-path``), gRPC health 9003 (plaintext; the
health services are also served on the ext_proc port, where Envoy's gRPC health check
asks), Prometheus 9090.

Health services: ``liveness`` is always SERVING; ``readiness``,
``envoy.service.ext_proc.v3.ExternalProcessor``, ``inference-extension`` and ``""`` are
SERVING once the first endpoint sync is done. On SIGTERM they all turn NOT_SERVING, new
streams are refused, and open streams get ``drain_s`` to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llmpool.picker import DEFAULT_TRANSPORT
from llmpool.picker.config import ConfigWatcher, PickerConfig
from llmpool.picker.director import Director
from llmpool.picker.discovery import PodSource, StaticSource
from llmpool.picker.metrics import PickerMetrics
from llmpool.picker.servicer import ExtProcServicer
from llmpool.picker.transport import Listen, Transport, make_transport
from llmpool.routing.policy import ConfigError
from llmpool.serving.collector import MetricsCollector
from llmpool.serving.datastore import Datastore, Endpoint

log = logging.getLogger("llmpool.picker")

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
READY_SERVICES = ("readiness", EXT_PROC_SERVICE, "inference-extension", "")


@dataclass(frozen=True, slots=True)
class ServerOptions:
    grpc_port: int = 9002
    health_port: int = 9003
    metrics_port: int = 9090
    host: str = "0.0.0.0"
    plaintext: bool = False
    cert_path: str | None = None  # a directory with tls.crt and tls.key
    drain_s: float = 30.0
    config_poll_s: float = 1.0
    transport: str = DEFAULT_TRANSPORT  # see llmpool.picker.transport


def self_signed_credentials() -> tuple[bytes, bytes]:
    """A fresh self-signed certificate and key (PEM), like the reference picker's default."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llmpool-endpoint-picker")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _credentials(opts: ServerOptions) -> tuple[bytes, bytes] | None:
    """(certificate PEM, key PEM) for the ext_proc port, or None for plaintext."""
    if opts.plaintext:
        return None
    if opts.cert_path:
        d = Path(opts.cert_path)
        try:
            cert, key = (d / "tls.crt").read_bytes(), (d / "tls.key").read_bytes()
        except OSError as err:
            raise ConfigError(f"--cert-path {d}: {err.strerror}: {err.filename}") from None
    else:
        cert, key = self_signed_credentials()
    return cert, key


class PickerServer:
    """One picker: build with a config and an endpoint source, then ``await run()``."""

    def __init__(
        self,
        cfg: PickerConfig,
        source: StaticSource | PodSource,
        opts: ServerOptions,
        *,
        config_path: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.opts = opts
        self.source = source
        self.config_path = config_path
        self.metrics = PickerMetrics()
        self.ds = Datastore(stale_after_s=cfg.scrape.stale_after_s)
        self.director = Director(cfg, self.ds, self.metrics)
        self.metrics.attach(self.ds, lambda: self.director.dispatcher.queued)
        self.servicer = ExtProcServicer(self.director)
        self.transport: Transport | None = None
        self._stop = asyncio.Event()
        self._synced = asyncio.Event()
        self.collector: MetricsCollector | None = None

    # ------------------------------------------------------------------ callbacks
    def _on_endpoints(self, endpoints: Sequence[Endpoint]) -> None:
        added, removed = self.ds.set_endpoints(endpoints)
        if added or removed:
            log.info("endpoints: %d (added %s, removed %s)", len(endpoints), added or "-", removed or "-")
        if self.collector is not None:
            self.collector.sync()
        self._synced.set()

    def _on_config(self, cfg: PickerConfig) -> None:
        try:
            self.director.apply_config(cfg)
        except ConfigError as err:
            self._on_config_error(str(err))
            return
        self.cfg = cfg
        if self.collector is not None:
            self.collector.interval_s = cfg.scrape.interval_s
        self.ds.stale_after_s = cfg.scrape.stale_after_s
        self.metrics.config_reloads.labels("applied").inc()
        self.metrics.config_valid.set(1)
        log.info("config reloaded: policy %s", cfg.policy.name)

    def _on_config_error(self, message: str) -> None:
        self.metrics.config_reloads.labels("invalid").inc()
        self.metrics.config_valid.set(0)
        log.error("config not applied, keeping the previous one: %s", message)

    async def _set_ready(self, serving: bool) -> None:
        assert self.transport is not None
        for name in READY_SERVICES:
            await self.transport.set_health(name, serving)

    # ------------------------------------------------------------------ run
    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        opts = self.opts
        tls = _credentials(opts)
        listen = Listen(opts.host, opts.grpc_port, opts.health_port, tls)
        transport = self.transport = make_transport(opts.transport, self.servicer, listen)
        await transport.set_health("liveness", True)
        await self._set_ready(False)
        addr = f"{opts.host}:{opts.grpc_port}"

        app = web.Application()
        app.router.add_get("/metrics", self._metrics_handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, opts.host, opts.metrics_port)

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300))
        self.collector = MetricsCollector(
            self.ds,
            session,
            interval_s=self.cfg.scrape.interval_s,
            timeout_s=self.cfg.scrape.timeout_s,
            metrics_path=self.cfg.scrape.metrics_path,
        )
        tasks: list[asyncio.Task[None]] = []
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        try:
            await transport.start()
            await site.start()
            log.info(
                "endpoint picker listening: ext_proc %s (%s, %s), health :%d, metrics :%d; policy %s",
                addr,
                "plaintext" if tls is None else "TLS",
                transport.name,
                opts.health_port,
                opts.metrics_port,
                self.cfg.policy.name,
            )
            tasks.append(loop.create_task(self.source.run(self._on_endpoints), name="endpoints"))
            if self.config_path:
                watcher = ConfigWatcher(
                    self.config_path,
                    interval_s=opts.config_poll_s,
                    on_change=self._on_config,
                    on_error=self._on_config_error,
                    current=self.cfg,
                )
                tasks.append(loop.create_task(watcher.run(), name="config"))
            synced = loop.create_task(self._synced.wait())
            stopped = loop.create_task(self._stop.wait())
            await asyncio.wait({synced, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if synced.done():
                await self.collector.start()
                await self._set_ready(True)
                log.info("ready: %d endpoint(s)", len(self.ds.endpoints))
            await stopped
            synced.cancel()
        finally:
            log.info("shutting down: draining open streams (up to %.0f s)", opts.drain_s)
            await self._set_ready(False)
            await transport.stop(opts.drain_s)
            self.director.close()
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            stop = getattr(self.source, "stop", None)
            if stop is not None:
                stop()
            await self.collector.stop()
            await session.close()
            await runner.cleanup()
            log.info("stopped")

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
