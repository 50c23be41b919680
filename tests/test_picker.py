"""The endpoint picker's servicer, fed ext_proc message sequences directly (no network):
protocol shape, routing answers, status codes, response accounting, and robustness."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from llmpool.picker import protocol
from llmpool.picker.bodies import ResponseTap, parse_request
from llmpool.picker.config import PickerConfig
from llmpool.picker.director import Director
from llmpool.picker.metrics import PickerMetrics
from llmpool.picker.servicer import ExtProcServicer
from llmpool.routing.policy import PolicyConfig
from llmpool.serving.datastore import Datastore, Endpoint
from llmpool.serving.scrape import EngineMetrics, ServerMetrics

FIXTURES = Path(__file__).parent / "fixtures" / "vllm-0.32"
EPS = ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000")


class _Abort(Exception):
    pass


class _Context:
    def __init__(self) -> None:
        self.aborted: tuple[Any, str] | None = None

    async def abort(self, code: Any, details: str) -> None:
        self.aborted = (code, details)
        raise _Abort(details)


def _picker(policy: str = "least-requests", **cfg: Any) -> tuple[ExtProcServicer, Datastore]:
    ds = Datastore([Endpoint.parse(e) for e in EPS])
    for i in range(len(EPS)):
        ds.scraped(i, ServerMetrics(engines={"0": EngineMetrics(0, 0, 0.1, 16, 1000)}), now=0.0)
    cfg.setdefault("max_endpoints", 3)
    conf = PickerConfig(policy=PolicyConfig(name=policy), **cfg)
    director = Director(conf, ds, PickerMetrics())
    return ExtProcServicer(director), ds


def _headers(h: dict[str, str], *, end: bool = False) -> pb.HttpHeaders:
    return pb.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in h.items()]
        ),
        end_of_stream=end,
    )


def _req_headers(
    path: str = "/v1/completions", extra: dict[str, str] | None = None, **kw: Any
) -> pb.ProcessingRequest:
    h = {":method": "POST", ":path": path, "content-type": "application/json", **(extra or {})}
    return pb.ProcessingRequest(request_headers=_headers(h, **kw))


def _body(data: bytes, end: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=end))


def _resp_headers(status: int = 200, ctype: str = "text/event-stream") -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_headers=_headers({":status": str(status), "content-type": ctype}))


def _resp_body(data: bytes, end: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=end))


async def _aiter(msgs: Iterable[pb.ProcessingRequest]) -> AsyncIterator[pb.ProcessingRequest]:
    for m in msgs:
        yield m
        await asyncio.sleep(0)


def _run(servicer: ExtProcServicer, msgs: Iterable[pb.ProcessingRequest]) -> list[pb.ProcessingResponse]:
    async def main() -> list[pb.ProcessingResponse]:
        return [r async for r in servicer.Process(_aiter(msgs), _Context())]  # type: ignore[arg-type]

    return asyncio.run(main())


def _destination(resp: pb.ProcessingResponse) -> tuple[str, str]:
    """(header value, metadata value) of a routing answer."""
    common = resp.request_headers.response if resp.HasField("request_headers") else resp.request_body.response
    hdr = {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}
    md = resp.dynamic_metadata.fields[protocol.DESTINATION_NAMESPACE].struct_value.fields
    return hdr[protocol.DESTINATION_KEY], md[protocol.DESTINATION_KEY].string_value


def _streamed_request_body(resps: list[pb.ProcessingResponse]) -> bytes:
    return b"".join(
        r.request_body.response.body_mutation.streamed_response.body
        for r in resps
        if r.HasField("request_body")
    )


COMPLETION = orjson.dumps({"model": "m", "prompt": "hello world " * 20, "max_tokens": 5})


def test_full_duplex_routes_after_the_body_and_streams_it_back() -> None:
    servicer, ds = _picker()
    big = orjson.dumps({"model": "m", "prompt": "x" * 150_000, "max_tokens": 3})
    half = len(big) // 2
    resps = _run(servicer, [_req_headers(), _body(big[:half], end=False), _body(big[half:], end=True)])
    kinds = [r.WhichOneof("response") for r in resps]
    assert kinds[0] == "request_headers" and all(k == "request_body" for k in kinds[1:])
    first = resps[0].request_headers.response
    assert first.clear_route_cache
    header, meta = _destination(resps[0])
    assert header == meta and header.split(",")[0] in EPS
    assert len(header.split(",")) == 3  # target + 2 fallbacks (max_endpoints 3)
    bodies = [r.request_body.response.body_mutation.streamed_response for r in resps[1:]]
    assert all(len(b.body) <= protocol.BODY_CHUNK_BYTES for b in bodies) and len(bodies) == 3
    assert [b.end_of_stream for b in bodies] == [False, False, True]
    assert _streamed_request_body(resps) == big  # untouched, in order
    sets = {h.header.key: h.header.raw_value.decode() for h in first.header_mutation.set_headers}
    assert sets["content-length"] == str(len(big)) and "x-request-id" in sets
    assert set(first.header_mutation.remove_headers) >= {protocol.DESTINATION_KEY, protocol.SERVED_KEY}
    assert ds.inflight_total() == 0  # the stream ended: the request is released


def test_streamed_response_usage_is_requested_stripped_and_counted() -> None:
    servicer, ds = _picker()
    finished: list[int] = []
    pol = servicer.director.policy
    orig = pol.on_completed
    pol.on_completed = lambda r, e, n, now: (finished.append(n), orig(r, e, n, now))  # type: ignore[method-assign]
    body = orjson.dumps({"model": "m", "prompt": "hi", "max_tokens": 4, "stream": True})
    sse = (FIXTURES / "completion_stream.txt").read_bytes()
    # split mid-event to check re-assembly
    parts = [sse[:100], sse[100:700], sse[700:]]
    msgs = [_req_headers(), _body(body), _resp_headers()]
    msgs += [_resp_body(p, end=i == len(parts) - 1) for i, p in enumerate(parts)]
    resps = _run(servicer, msgs)
    forwarded = orjson.loads(_streamed_request_body(resps))
    assert forwarded["stream_options"] == {"include_usage": True}
    out = b"".join(
        r.response_body.response.body_mutation.streamed_response.body
        for r in resps
        if r.HasField("response_body")
    )
    usage_event = next(e for e in sse.split(b"\n\n") if b'"choices":[]' in e)
    assert out == sse.replace(usage_event + b"\n\n", b"")  # exactly what the client asked for
    assert finished == [4] and ds.inflight_total() == 0


def test_streamed_response_passes_byte_exact_when_client_asked_for_usage() -> None:
    servicer, _ = _picker()
    body = orjson.dumps(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    sse = (FIXTURES / "chat_stream.txt").read_bytes()
    chunks = [sse[i : i + 97] for i in range(0, len(sse), 97)]
    msgs = [_req_headers("/v1/chat/completions"), _body(body), _resp_headers()]
    msgs += [_resp_body(c, end=i == len(chunks) - 1) for i, c in enumerate(chunks)]
    resps = _run(servicer, msgs)
    sent = [
        r.response_body.response.body_mutation.streamed_response.body
        for r in resps
        if r.HasField("response_body")
    ]
    assert sent == chunks  # one answer per chunk, immediately, byte for byte
    assert _streamed_request_body(resps) == body  # body not rewritten


def test_response_tap_counts_tokens_and_reads_json_usage() -> None:
    tap = ResponseTap(sse=True)
    sse = (FIXTURES / "chat_stream.txt").read_bytes()
    tap.feed(sse, True)
    assert tap.generated == 3 and tap.usage is not None and tap.usage.completion_tokens == 3
    tap = ResponseTap(sse=False)
    raw = (FIXTURES / "completion.json").read_bytes()
    assert tap.feed(raw[:50], False) == raw[:50]
    tap.feed(raw[50:], True)
    assert tap.usage is not None and tap.completion_tokens == orjson.loads(raw)["usage"]["completion_tokens"]


def test_model_rewrite_goes_upstream_and_back() -> None:
    servicer, _ = _picker()
    raw = (FIXTURES / "completion.json").read_bytes()
    served = orjson.loads(raw)["model"]
    msgs = [
        _req_headers(extra={"x-gateway-model-name-rewrite": served}),
        _body(COMPLETION),
        _resp_headers(ctype="application/json"),
        _resp_body(raw[:40], end=False),
        _resp_body(raw[40:], end=True),
    ]
    resps = _run(servicer, msgs)
    assert orjson.loads(_streamed_request_body(resps))["model"] == served
    out = b"".join(
        r.response_body.response.body_mutation.streamed_response.body
        for r in resps
        if r.HasField("response_body")
    )
    assert orjson.loads(out)["model"] == "m"


@pytest.mark.parametrize(
    ("hint", "expect"),
    [
        (["10.0.0.2:8000"], {"10.0.0.2:8000"}),
        ("10.0.0.3, 10.0.0.2", {"10.0.0.3:8000", "10.0.0.2:8000"}),  # comma string, IPs only
        ([], None),  # empty hint: 503
        (["10.9.9.9:8000"], None),  # nothing eligible: 503
    ],
)
def test_subset_hint_is_strict(hint: Any, expect: set[str] | None) -> None:
    servicer, _ = _picker()
    md = base_pb2.Metadata()
    v = md.filter_metadata[protocol.SUBSET_NAMESPACE].fields[protocol.SUBSET_KEY]
    if isinstance(hint, str):
        v.string_value = hint
    else:
        v.list_value.SetInParent()
        for h in hint:
            v.list_value.values.add().string_value = h
    msgs = [
        _req_headers(),
        pb.ProcessingRequest(
            request_body=pb.HttpBody(body=COMPLETION, end_of_stream=True), metadata_context=md
        ),
    ]
    for _ in range(6):
        resps = _run(servicer, msgs)
        if expect is None:
            assert resps[0].immediate_response.status.code == 503
        else:
            header, _ = _destination(resps[0])
            assert set(header.split(",")) <= expect and header.split(",")[0] in expect


@pytest.mark.parametrize(
    ("body", "path", "message"),
    [
        (b"{not json", "/v1/completions", "not valid JSON"),
        (b'{"prompt": "x"}', "/v1/completions", "model not found"),
        (b'{"model": "m", "messages": []}', "/v1/chat/completions", "messages"),
        (b'{"model": "m", "prompt": 5}', "/v1/completions", "prompt"),
        (b'{"model": "m", "prompt": "x", "max_tokens": -1}', "/v1/completions", "max_tokens"),
        (b'{"model": "m", "prompt": [1, 9223372036854775809]}', "/v1/completions", "at most 64 bits"),
    ],
)
def test_bad_bodies_get_400(body: bytes, path: str, message: str) -> None:
    servicer, ds = _picker()
    resps = _run(servicer, [_req_headers(path), _body(body)])
    imm = resps[0].immediate_response
    assert imm.status.code == 400 and message in orjson.loads(imm.body)["error"]["message"]
    assert ds.inflight_total() == 0


def test_no_endpoints_503_and_sheddable_429() -> None:
    servicer, ds = _picker(objectives={"batch": -1})
    # saturate: every endpoint has a long queue
    for i in range(3):
        ds.scraped(i, ServerMetrics(engines={"0": EngineMetrics(10, 50, 0.95, 16, 1000)}), now=1.0)
    shed = _req_headers(extra={"x-gateway-inference-objective": "batch"})
    imm = _run(servicer, [shed, _body(COMPLETION)])[0].immediate_response
    assert imm.status.code == 429
    assert any(h.header.key == protocol.DROPPED_REASON_HEADER for h in imm.headers.set_headers)
    # a non-sheddable request still goes through
    assert _run(servicer, [_req_headers(), _body(COMPLETION)])[0].HasField("request_headers")
    ds.set_endpoints([])
    assert _run(servicer, [_req_headers(), _body(COMPLETION)])[0].immediate_response.status.code == 503


def test_get_without_body_is_routed_at_once() -> None:
    servicer, ds = _picker()
    resps = _run(
        servicer,
        [pb.ProcessingRequest(request_headers=_headers({":method": "GET", ":path": "/v1/models"}, end=True))],
    )
    header, meta = _destination(resps[0])
    assert header == meta and header in EPS and ds.inflight_total() == 0


def test_buffered_mode_routes_in_the_body_answer() -> None:
    servicer, _ = _picker()
    cfg = pb.ProcessingRequest(
        request_headers=_req_headers().request_headers,
        protocol_config=pb.ProtocolConfiguration(
            request_body_mode=processing_mode_pb2.ProcessingMode.BUFFERED,
            response_body_mode=processing_mode_pb2.ProcessingMode.BUFFERED,
        ),
    )
    resps = _run(
        servicer,
        [
            cfg,
            _body(COMPLETION),
            _resp_headers(ctype="application/json"),
            _resp_body((FIXTURES / "completion.json").read_bytes(), end=True),
        ],
    )
    kinds = [r.WhichOneof("response") for r in resps]
    assert kinds == ["request_headers", "request_body", "response_headers", "response_body"]
    header, meta = _destination(resps[1])
    assert header == meta and header.split(",")[0] in EPS
    assert not resps[1].request_body.response.body_mutation.HasField("streamed_response")


def test_conformance_headers() -> None:
    servicer, _ = _picker()
    resps = _run(
        servicer,
        [_req_headers(extra={protocol.CONFORMANCE_SELECT_HEADER: "10.0.0.3,10.0.0.1"}), _body(COMPLETION)],
    )
    assert _destination(resps[0])[0] == "10.0.0.3:8000,10.0.0.1:8000"
    md = base_pb2.Metadata()
    md.filter_metadata[protocol.DESTINATION_NAMESPACE].fields[
        protocol.SERVED_KEY
    ].string_value = "10.0.0.3:8000"
    msgs = [
        _req_headers(),
        _body(COMPLETION),
        pb.ProcessingRequest(response_headers=_headers({":status": "200"}), metadata_context=md),
    ]
    resps = _run(servicer, msgs)
    echo = resps[-1].response_headers.response.header_mutation.set_headers
    assert [(h.header.key, h.header.raw_value) for h in echo] == [
        (protocol.CONFORMANCE_SERVED_HEADER, b"10.0.0.3:8000")
    ]


def test_client_gone_mid_stream_releases_the_request() -> None:
    servicer, ds = _picker()
    seen: list[int] = []
    pol = servicer.director.policy
    pol.on_completed = lambda r, e, n, now: seen.append(n)  # type: ignore[method-assign]
    body = orjson.dumps({"model": "m", "prompt": "hi", "stream": True})
    sse = (FIXTURES / "completion_stream.txt").read_bytes()
    _run(servicer, [_req_headers(), _body(body), _resp_headers(), _resp_body(sse[:300], end=False)])
    assert ds.inflight_total() == 0 and seen == [-1]  # censored: nothing to learn


def test_parse_request_counts_tokens_and_prefixes() -> None:
    p = parse_request(orjson.dumps({"model": "m", "prompt": list(range(200))}), chat=False)
    assert p.prompt_tokens == 200 and len(p.prefix_hashes) == 3
    q = parse_request(orjson.dumps({"model": "m", "prompt": [*range(128), 7, 7]}), chat=False)
    assert q.prefix_hashes[:2] == p.prefix_hashes[:2]  # shared prefix, same block hashes
    c = parse_request(
        orjson.dumps(
            {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_completion_tokens": 9}
        ),
        chat=True,
    )
    assert c.max_tokens == 9 and c.prompt_tokens > 1


# ------------------------------------------------------------------------------------------
# Robustness: random and out-of-order message sequences, malformed bodies
# ------------------------------------------------------------------------------------------

_bodies = hs.one_of(
    hs.binary(max_size=300),
    hs.just(COMPLETION),
    hs.just(b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": true}'),
    hs.builds(
        lambda d: orjson.dumps(d),
        hs.dictionaries(
            hs.sampled_from(["model", "prompt", "messages", "stream", "max_tokens"]),
            hs.one_of(hs.none(), hs.integers(-(2**40), 2**40), hs.text(max_size=5), hs.booleans()),
        ),
    ),
)


def _message(kind: str, data: bytes, end: bool, status: int) -> pb.ProcessingRequest:
    if kind == "request_headers":
        return _req_headers(end=end)
    if kind == "request_body":
        return _body(data, end)
    if kind == "request_trailers":
        return pb.ProcessingRequest(request_trailers=pb.HttpTrailers())
    if kind == "response_headers":
        return _resp_headers(status)
    if kind == "response_body":
        return _resp_body(data, end)
    if kind == "response_trailers":
        return pb.ProcessingRequest(response_trailers=pb.HttpTrailers())
    return pb.ProcessingRequest()  # nothing set at all


_kinds = hs.sampled_from(
    [
        "request_headers",
        "request_body",
        "request_trailers",
        "response_headers",
        "response_body",
        "response_trailers",
        "empty",
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hs.sampled_from(["least-requests", "impact", "brh"]),
    hs.lists(hs.tuples(_kinds, _bodies, hs.booleans(), hs.sampled_from([200, 400, 500])), max_size=8),
)
def test_random_message_sequences_never_crash_or_leak(
    policy: str, seq: list[tuple[str, bytes, bool, int]]
) -> None:
    servicer, ds = _picker(policy)

    async def main() -> None:
        ctx = _Context()
        try:
            async for r in servicer.Process(_aiter(_message(*m) for m in seq), ctx):  # type: ignore[arg-type]
                assert r.WhichOneof("response") is not None
        except _Abort:
            pytest.fail(f"stream aborted: {ctx.aborted}")

    asyncio.run(main())
    assert ds.inflight_total() == 0 and servicer.director.dispatcher.queued == 0
    assert servicer.open_streams == 0
    pol: Any = servicer.director.policy
    if policy == "impact":  # the policy's own per-request state is released too
        assert not pol._expected and not pol._where


def test_unexpected_failure_is_a_grpc_error_not_a_crash() -> None:
    servicer, ds = _picker()

    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("policy exploded")

    servicer.director.policy.decide = boom  # type: ignore[method-assign]

    async def main() -> _Context:
        ctx = _Context()
        with pytest.raises(_Abort):
            async for _ in servicer.Process(_aiter([_req_headers(), _body(COMPLETION)]), ctx):  # type: ignore[arg-type]
                pass
        return ctx

    ctx = asyncio.run(main())
    assert ctx.aborted is not None and ctx.aborted[0] == grpc.StatusCode.INTERNAL
    assert ds.inflight_total() == 0


def test_token_estimate_is_corrected_by_usage() -> None:
    servicer, _ = _picker()
    d = servicer.director
    text = "word " * 400  # 2000 bytes: estimated 500 tokens
    p = parse_request(orjson.dumps({"model": "m", "prompt": text}), chat=False)
    assert p.prompt_tokens == 500 and not p.exact_tokens and len(p.prefix_hashes) == 2000 // 256
    for _ in range(200):  # the server keeps saying 400
        d.tokens.observe(500, 400)
    assert d.tokens.scale(500) == 400
