"""Entry point of the LLMPool operator: ``run(argv)`` (``llmpool operator ...``) or ``kopf run``.

``run`` builds its own registry (:func:`llmpool_operator.handlers.build_registry`) and runs
Kopf's operator in asyncio. For ``kopf run -m llmpool_operator.main`` (or the file path),
importing this module also registers the same handlers on Kopf's default registry,
configured from the environment (``LLMPOOL_PICKER_IMAGE``, ``LLMPOOL_DRIFT_INTERVAL``,
``LLMPOOL_PERSISTENCE``, ``LLMPOOL_POSTING``, ``LLMPOOL_METRICS_PORT``); that is the only
import-time side effect of the package.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
from collections.abc import Sequence
from typing import Any

import kopf
from prometheus_client import start_http_server

from llmpool_operator.handlers import OperatorConfig, OperatorMetrics, build_registry, configure_settings

__all__ = ["build_parser", "run"]

DEFAULT_PEERING = "llmpool-operator"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmpool operator",
        description="Run the LLMPool Kopf operator (reconciles llmpools.llmpool.io into their children).",
    )
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch this namespace (repeatable; globs allowed)",
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch every namespace (cluster-wide)"
    )
    p.add_argument(
        "--picker-image", default=os.environ.get("LLMPOOL_PICKER_IMAGE"), help="endpoint picker image"
    )
    p.add_argument(
        "--metrics-port", type=int, default=8081, help="Prometheus port for operator metrics (0: off)"
    )
    p.add_argument("--liveness-port", type=int, default=8080, help="port of /healthz (0: off)")
    p.add_argument(
        "--webhook-port",
        type=int,
        default=0,
        help="serve the validating admission webhook (HTTPS) on this port (default 0: off)",
    )
    p.add_argument("--webhook-cert", metavar="FILE", help="the webhook's TLS certificate (PEM)")
    p.add_argument("--webhook-key", metavar="FILE", help="the webhook's TLS private key (PEM)")
    peer = p.add_mutually_exclusive_group()
    peer.add_argument(
        "--peering",
        metavar="NAME",
        help="KopfPeering object for active/standby replicas (needs the kopf.dev CRDs and RBAC)",
    )
    peer.add_argument("--standalone", action="store_true", help="no peering (the default)")
    p.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority (default with --peering: random 1..10000, so replicas never tie)",
    )
    p.add_argument("--persistence", choices=["annotations", "status"], default="annotations")
    p.add_argument("--no-events", action="store_true", help="do not post Kubernetes Events")
    p.add_argument("--drift-interval", type=float, default=30.0, help="seconds between drift repairs")
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        k8s = getattr(record, "k8s_ref", None)
        if k8s:
            out["object"] = k8s
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _setup_logging(fmt: str, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def run(argv: Sequence[str] | None = None) -> int:
    """``llmpool operator [flags]``: run until SIGINT/SIGTERM; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.webhook_port and not (args.webhook_cert and args.webhook_key):
        parser.error("--webhook-port needs --webhook-cert and --webhook-key (the API server calls HTTPS)")
    _setup_logging(args.log_format, args.verbose)
    metrics = OperatorMetrics()
    if args.metrics_port:
        start_http_server(args.metrics_port, registry=metrics.registry)
    config = OperatorConfig(
        picker_image=args.picker_image or None,
        drift_interval=args.drift_interval,
        drift_idle=min(10.0, args.drift_interval / 3),
        admission=bool(args.webhook_port),
    )
    registry = build_registry(config, metrics)
    settings = kopf.OperatorSettings()
    configure_settings(settings, persistence=args.persistence, posting=not args.no_events)
    if args.webhook_port:
        # Served by every replica (peering pauses reconciling, not admission); the chart
        # ships the ValidatingWebhookConfiguration and the certificate, so Kopf manages neither.
        settings.admission.server = kopf.WebhookServer(
            addr="0.0.0.0", port=args.webhook_port, certfile=args.webhook_cert, pkeyfile=args.webhook_key
        )
    standalone = args.peering is None
    priority = args.priority
    if not standalone and priority is None:
        priority = random.randint(1, 10000)
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
    try:
        asyncio.run(
            kopf.operator(
                registry=registry,
                settings=settings,
                standalone=standalone,
                peering_name=args.peering,
                priority=priority,
                clusterwide=bool(args.all_namespaces),
                namespaces=args.namespace or ([] if args.all_namespaces else ["default"]),
                liveness_endpoint=liveness,
            )
        )
    except KeyboardInterrupt:
        return 130
    return 0


# --- `kopf run` compatibility -------------------------------------------------------------


def _register_default() -> None:
    metrics = OperatorMetrics()
    port = int(os.environ.get("LLMPOOL_METRICS_PORT", "0") or 0)
    registry = kopf.get_default_registry()
    build_registry(OperatorConfig.from_env(), metrics, registry=registry)

    @kopf.on.startup(registry=registry)
    def _configure(settings: Any, **_: Any) -> None:
        configure_settings(
            settings,
            persistence=os.environ.get("LLMPOOL_PERSISTENCE", "annotations"),
            posting=os.environ.get("LLMPOOL_POSTING", "true").lower() not in ("0", "false", "no"),
        )
        if port:
            start_http_server(port, registry=metrics.registry)


if os.environ.get("LLMPOOL_OPERATOR_NO_DEFAULT_REGISTRY") is None:
    _register_default()


if __name__ == "__main__":
    sys.exit(run())
