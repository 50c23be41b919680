"""The vLLM server contract LLMPool relies on, as executable checks.

Each entry of :data:`CHECKS` is an ``async def check(session, base_url, model)`` that
talks to one server over HTTP and raises :class:`AssertionError` with a one-line
message naming what is wrong. The same checks run against the emulator
(tests/test_emulator.py) and against real vLLM 0.32 on the CPU
(tests/e2e/vllm_cpu/test_vllm_contract.py), so they assert only what real vLLM does:
the shapes below were taken from responses captured from a vLLM 0.32.0 server
(tests/fixtures/vllm-0.32/) and from the model-server notes, sections 1 and 2.

Rules for the checks themselves: small ``max_tokens`` (at most 8) with ``ignore_eos``
so that they are fast on a CPU server and the number of generated tokens is exact;
never a per-request ``seed`` (it crashes vllm-cpu 0.32); a check may make the server
do work but must leave it healthy.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from llmpool.serving.scrape import ScrapeError, ServerMetrics, parse_vllm_metrics

Check = Callable[[aiohttp.ClientSession, str, str], Awaitable[None]]

#: Keys of a non-streamed ``/v1/completions`` response (vLLM 0.32.0).
COMPLETION_KEYS = frozenset({
    "id", "object", "created", "model", "choices", "service_tier", "system_fingerprint", "usage",
    "kv_transfer_params", "ec_transfer_params", "metrics",
})  # fmt: skip
COMPLETION_CHOICE_KEYS = frozenset({
    "index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids", "prompt_logprobs",
    "prompt_token_ids", "routed_experts",
})  # fmt: skip
#: Keys of a non-streamed ``/v1/chat/completions`` response.
CHAT_KEYS = frozenset({
    "id", "object", "created", "model", "choices", "service_tier", "system_fingerprint", "usage",
    "prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params", "ec_transfer_params",
    "metrics",
})  # fmt: skip
CHAT_CHOICE_KEYS = frozenset({
    "index", "message", "logprobs", "finish_reason", "stop_reason", "token_ids", "routed_experts",
})  # fmt: skip
CHAT_MESSAGE_KEYS = frozenset({
    "role", "content", "refusal", "annotations", "audio", "function_call", "reasoning",
})  # fmt: skip
USAGE_KEYS = frozenset({
    "prompt_tokens", "total_tokens", "completion_tokens",
    "prompt_tokens_details", "completion_tokens_details",
})  # fmt: skip
#: Keys of the final usage chunk of a stream with ``stream_options.include_usage``.
STREAM_USAGE_CHUNK_KEYS = frozenset({"id", "object", "created", "model", "choices", "usage"})
STREAM_USAGE_KEYS = frozenset({"prompt_tokens", "total_tokens", "completion_tokens"})
MODEL_CARD_KEYS = frozenset({
    "id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission",
})  # fmt: skip
MODEL_PERMISSION_KEYS = frozenset({
    "id", "object", "created", "allow_create_engine", "allow_sampling", "allow_logprobs",
    "allow_search_indices", "allow_view", "allow_fine_tuning", "organization", "group", "is_blocking",
})  # fmt: skip
ERROR_KEYS = frozenset({"message", "type", "param", "code"})

#: vLLM's TTFT histogram buckets (``vllm:time_to_first_token_seconds``).
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip

MAX_TOKENS = 6  # small, so that the checks are fast on a CPU server
PROMPT = "The quick brown fox jumps over the lazy dog. Tell me a story about it"
MESSAGES = ({"role": "user", "content": "Say hello to the router."},)
PER_ENGINE_LABELS = frozenset({"model_name", "engine"})
#: Gauges a router reads, each with exactly the labels model_name and engine.
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
#: Counters (exposed with '_total') carrying at least model_name and engine.
COUNTERS = (
    "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:num_preemptions",
    "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:request_success",
)  # fmt: skip


# --------------------------------------------------------------------------- helpers
def _fail(where: str, message: str) -> AssertionError:
    return AssertionError(f"{where}: {message}")


def _expect(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise _fail(where, message)


def _has_keys(obj: Any, keys: frozenset[str], where: str) -> dict[str, Any]:
    """``obj`` is a JSON object holding at least ``keys`` (real vLLM may add fields)."""
    _expect(isinstance(obj, dict), where, f"expected a JSON object, got {_short(obj)}")
    assert isinstance(obj, dict)
    missing = sorted(keys - obj.keys())
    _expect(not missing, where, f"missing keys {missing} (has {sorted(obj)})")
    return obj


def _short(v: Any, limit: int = 200) -> str:
    s = json.dumps(v) if not isinstance(v, str | bytes) else repr(v)
    return s if len(s) <= limit else s[:limit] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


async def _post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any] | bytes
) -> tuple[int, str, bytes]:
    """POST a JSON body (or raw bytes sent as JSON); returns status, content type, body."""
    if isinstance(body, bytes):
        kw: dict[str, Any] = {"data": body, "headers": {"Content-Type": "application/json"}}
    else:
        kw = {"json": body}
    async with session.post(url, **kw) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.read()


def _json(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise _fail(where, f"response is not JSON: {_short(raw)}") from None


async def _ok_json(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], where: str
) -> dict[str, Any]:
    status, _, raw = await _post(session, url, body)
    _expect(status == 200, where, f"HTTP {status}, expected 200: {_short(raw)}")
    out = _json(raw, where)
    _expect(isinstance(out, dict), where, f"expected a JSON object, got {_short(out)}")
    assert isinstance(out, dict)
    return out


def parse_sse(raw: bytes, where: str) -> list[dict[str, Any]]:
    """The JSON chunks of an SSE body framed as vLLM frames it: every event is one
    ``data: <json>`` line followed by a blank line, and the last is ``data: [DONE]``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _fail(where, f"stream is not UTF-8: {err}") from None
    _expect(
        text.endswith("data: [DONE]\n\n"),
        where,
        f"stream does not end with 'data: [DONE]': {_short(text[-120:])}",
    )
    events = text.split("\n\n")
    _expect(events[-1] == "", where, "stream does not end with a blank line")
    events = events[:-1]
    chunks: list[dict[str, Any]] = []
    for i, ev in enumerate(events):
        _expect(ev.startswith("data: "), where, f"event {i} is not a 'data: ' line: {_short(ev)}")
        _expect("\n" not in ev, where, f"event {i} spans several lines: {_short(ev)}")
        payload = ev[len("data: ") :]
        if payload == "[DONE]":
            _expect(i == len(events) - 1, where, f"'[DONE]' is event {i} of {len(events)}, not the last")
            break
        try:
            chunk = json.loads(payload)
        except ValueError:
            raise _fail(where, f"event {i} is not JSON: {_short(payload)}") from None
        _expect(isinstance(chunk, dict), where, f"event {i} is not a JSON object: {_short(chunk)}")
        chunks.append(chunk)
    _expect(bool(chunks), where, "stream has no chunks before [DONE]")
    return chunks


async def _stream(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], where: str
) -> list[dict[str, Any]]:
    status, ctype, raw = await _post(session, url, body)
    _expect(status == 200, where, f"HTTP {status}, expected 200: {_short(raw)}")
    _expect(
        ctype.startswith("text/event-stream"), where, f"Content-Type {ctype!r}, expected text/event-stream"
    )
    return parse_sse(raw, where)


def _check_usage(usage: Any, keys: frozenset[str], completion: int, where: str) -> None:
    u = _has_keys(usage, keys, where + " usage")
    p, c, t = u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]
    _expect(_is_int(p) and p > 0, where, f"usage.prompt_tokens {p!r} is not a positive integer")
    _expect(c == completion, where, f"usage.completion_tokens is {c!r}, expected {completion} (ignore_eos)")
    _expect(t == p + c, where, f"usage.total_tokens {t!r} != prompt_tokens + completion_tokens ({p} + {c})")


def _check_head(chunk: dict[str, Any], obj: str, model: str, rid: str, where: str) -> None:
    _expect(chunk.get("object") == obj, where, f"object is {chunk.get('object')!r}, expected {obj!r}")
    _expect(chunk.get("model") == model, where, f"model is {chunk.get('model')!r}, expected {model!r}")
    _expect(chunk.get("id") == rid, where, f"id changed within the stream ({chunk.get('id')!r} != {rid!r})")
    _expect(_is_int(chunk.get("created")), where, f"created {chunk.get('created')!r} is not an integer")


def check_stream_chunks(
    chunks: list[dict[str, Any]], *, chat: bool, model: str, n: int, usage: bool, where: str
) -> None:
    """Common rules of a streamed completion or chat completion of ``n`` tokens."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    rid = chunks[0].get("id")
    _expect(
        isinstance(rid, str) and rid.startswith("chatcmpl-" if chat else "cmpl-"), where, f"bad id {rid!r}"
    )
    assert isinstance(rid, str)
    for i, ch in enumerate(chunks):
        _check_head(ch, obj, model, rid, f"{where} chunk {i}")
    content = chunks
    if usage:
        last = chunks[-1]
        _has_keys(last, STREAM_USAGE_CHUNK_KEYS, f"{where} usage chunk")
        _expect(
            last["choices"] == [], where, f"usage chunk has choices {_short(last['choices'])}, expected []"
        )
        _check_usage(last["usage"], STREAM_USAGE_KEYS, n, f"{where} usage chunk")
        content = chunks[:-1]
    for i, ch in enumerate(content):
        _expect(ch.get("usage") is None, where, f"chunk {i} carries usage {_short(ch.get('usage'))}")
        choices = ch.get("choices")
        _expect(
            isinstance(choices, list) and len(choices) == 1, where, f"chunk {i} choices {_short(choices)}"
        )
    _expect(bool(content), where, "no content chunks")
    if chat:
        delta = content[0]["choices"][0].get("delta")
        _expect(isinstance(delta, dict) and delta.get("role") == "assistant", where,
                f"first chat chunk has delta {_short(delta)}, expected role 'assistant'")  # fmt: skip
    for i, ch in enumerate(content):
        choice = ch["choices"][0]
        _expect(choice.get("index") == 0, where, f"chunk {i} choice index {choice.get('index')!r}")
        piece = choice.get("delta", {}).get("content") if chat else choice.get("text")
        _expect(
            piece is None or isinstance(piece, str), where, f"chunk {i} has non-string text {_short(piece)}"
        )
        reason = choice.get("finish_reason")
        if i < len(content) - 1:
            _expect(reason is None, where, f"chunk {i} of {len(content)} has finish_reason {reason!r}")
        else:
            _expect(
                reason == "length",
                where,
                f"last content chunk has finish_reason {reason!r}, expected 'length'",
            )


# --------------------------------------------------------------------------- checks
async def check_health(session: aiohttp.ClientSession, base_url: str, model: str) -> None:
    """GET /health answers 200."""
    async with session.get(f"{base_url}/health") as r:
        _expect(r.status == 200, "GET /health", f"HTTP {r.status}, expected 200")


async def _model_card(session: aiohttp.ClientSession, base_url: str, model: str) -> dict[str, Any]:
    where = "GET /v1/models"
    async with session.get(f"{base_url}/v1/models") as r:
        _expect(r.status == 200, where, f"HTTP {r.status}, expected 200")
        body = _json(await r.read(), where)
    _has_keys(body, frozenset({"object", "data"}), where)
    _expect(body["object"] == "list", where, f"object is {body['object']!r}, expected 'list'")
    data = body["data"]
    _expect(isinstance(data, list), where, f"data is {_short(data)}, expected a list")
    cards = [c for c in data if isinstance(c, dict) and c.get("id") == model]
    _expect(len(cards) == 1, where, f"model {model!r} is listed {len(cards)} times in {_short(data)}")
    return cards[0]


async def check_models(session: aiohttp.ClientSession, base_url: str, model: str) -> None:
    """/v1/models lists the model with vLLM's model-card shape and its max_model_len."""
    where = "GET /v1/models"
    card = _has_keys(await _model_card(session, base_url, model), MODEL_CARD_KEYS, where + " card")
    _expect(card["object"] == "model", where, f"card object is {card['object']!r}, expected 'model'")
    _expect(card["owned_by"] == "vllm", where, f"owned_by is {card['owned_by']!r}, expected 'vllm'")
    _expect(card["parent"] is None, where, f"base model has parent {card['parent']!r}")
    _expect(_is_int(card["created"]), where, f"created {card['created']!r} is not an integer")
    mml = card["max_model_len"]
    _expect(_is_int(mml) and mml > 0, where, f"max_model_len {mml!r} is not a positive integer")
    perms = card["permission"]
    _expect(isinstance(perms, list) and len(perms) >= 1, where, f"permission is {_short(perms)}")
    perm = _has_keys(perms[0], MODEL_PERMISSION_KEYS, where + " permission")
    _expect(perm["object"] == "model_permission", where, f"permission object is {perm['object']!r}")


async def check_completion(session: aiohttp.ClientSession, base_url: str, model: str) -> None:
    """Non-streamed /v1/completions: vLLM's response shape and exact usage with ignore_eos."""
    where = "POST /v1/completions"
    body = await _ok_json(
        session,
        f"{base_url}/v1/completions",
        {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0.0},
        where,
    )
    _has_keys(body, COMPLETION_KEYS, where)
    _expect(body["object"] == "text_completion", where, f"object is {body['object']!r}")
    _expect(body["model"] == model, where, f"model is {body['model']!r}, expected {model!r}")
    _expect(isinstance(body["id"], str) and body["id"].startswith("cmpl-"), where, f"id is {body['id']!r}")
    _expect(_is_int(body["created"]), where, f"created {body['created']!r} is not an integer")
    choices = body["choices"]
    _expect(isinstance(choices, list) and len(choices) == 1, where, f"choices is {_short(choices)}")
    ch = _has_keys(choices[0], COMPLETION_CHOICE_KEYS, where + " choice")
    _expect(ch["index"] == 0, where, f"choice index {ch['index']!r}")
    _expect(isinstance(ch["text"], str), where, f"choice text {_short(ch['text'])} is not a string")
    _expect(
        ch["finish_reason"] == "length", where, f"finish_reason {ch['finish_reason']!r}, expected 'length'"
    )
    _check_usage(body["usage"], USAGE_KEYS, MAX_TOKENS, where)


async def check_chat(session: aiohttp.ClientSession, base_url: str, model: str) -> None:
    """Non-streamed /v1/chat/completions: vLLM's response shape and exact usage."""
    where = "POST /v1/chat/completions"
    body = await _ok_json(
        session,
        f"{base_url}/v1/chat/completions",
        {"model": model, "messages": list(MESSAGES), "max_tokens": MAX_TOKENS, "ignore_eos": True},
        where,
    )
    _has_keys(body, CHAT_KEYS, where)
    _expect(body["object"] == "chat.completion", where, f"object is {body['object']!r}")
    _expect(body["model"] == model, where, f"model is {body['model']!r}, expected {model!r}")
    _expect(
        isinstance(body["id"], str) and body["id"].startswith("chatcmpl-"), where, f"id is {body['id']!r}"
    )
    choices = body["choices"]
    _expect(isinstance(choices, list) and len(choices) == 1, where, f"choices is {_short(choices)}")
    ch = _has_keys(choices[0], CHAT_CHOICE_KEYS, where + " choice")
    msg = _has_keys(ch["message"], CHAT_MESSAGE_KEYS, where + " message")
    _expect(msg["role"] == "assistant", where, f"message role {msg['role']!r}, expected 'assistant'")
    _expect(isinstance(msg["content"], str), where, f"content {_short(msg['content'])} is not a string")
    _expect(
        ch["finish_reason"] == "length", where, f"finish_reason {ch['finish_reason']!r}, expected 'length'"
    )
    _check_usage(body["usage"], USAGE_KEYS, MAX_TOKENS, where)


async def check_stream_completion(session: aiohttp.ClientSession, base_url: str, model: str) -> None:
    """Streamed /v1/completions with include_usage: SSE framing, finish_reason, usage chunk, [DONE]."""
    where = "POST /v1/completions (stream)"
    chunks = await _stream(
        session,
        f"{base_url}/v1/completions",
        {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True,
         "stream_options": {"include_usage": True}},
        where,
    )  # fmt: skip
    check_stream_chunks(chunks, chat=False, model=model, n=MAX_TOKENS, usage=True, where=where)


async def check_stream_chat(session: aiohttp.ClientSession, base_url: str, model: str) -> None:
    """Streamed chat with include_usage: role chunk first, finish_reason, usage chunk, [DONE]."""
    where = "POST /v1/chat/completions (stream)"
    chunks = await _stream(
        session,
        f"{base_url}/v1/chat/completions",
        {"model": model, "messages": list(MESSAGES), "max_completion_tokens": MAX_TOKENS, "ignore_eos": True,
         "stream": True, "stream_options": {"include_usage": True}},
        where,
    )  # fmt: skip
    check_stream_chunks(chunks, chat=True, model=model, n=MAX_TOKENS, usage=True, where=where)


async def check_no_usage_without_option(session: aiohttp.ClientSession, base_url: str, model: str) -> None:
    """Without stream_options there is no usage anywhere in a stream (completion and chat)."""
    n = 3
    for chat in (False, True):
        where = f"POST {'/v1/chat/completions' if chat else '/v1/completions'} (stream, no stream_options)"
        body: dict[str, Any] = {"model": model, "max_tokens": n, "ignore_eos": True, "stream": True}
        if chat:
            body["messages"] = list(MESSAGES)
        else:
            body["prompt"] = PROMPT
        path = "/v1/chat/completions" if chat else "/v1/completions"
        chunks = await _stream(session, f"{base_url}{path}", body, where)
        for i, ch in enumerate(chunks):
            _expect(ch.get("usage") is None, where, f"chunk {i} carries usage {_short(ch.get('usage'))}")
            _expect(ch.get("choices") != [], where, f"chunk {i} is a usage-style chunk with no choices")
        check_stream_chunks(chunks, chat=chat, model=model, n=n, usage=False, where=where)


def _check_error(
    status: int, raw: bytes, want_status: int, want_type: str | None, where: str
) -> dict[str, Any]:
    _expect(status == want_status, where, f"HTTP {status}, expected {want_status}: {_short(raw)}")
    body = _json(raw, where)
    _expect(isinstance(body, dict) and isinstance(body.get("error"), dict), where,
            f"expected an 'error' object, got {_short(body)}")  # fmt: skip
    err: dict[str, Any] = body["error"]
    _expect(
        isinstance(err.get("message"), str) and err["message"] != "", where, f"error has no message: {err}"
    )
    if want_type is not None:
        _has_keys(err, ERROR_KEYS, where + " error")
        _expect(err["type"] == want_type, where, f"error.type is {err['type']!r}, expected {want_type!r}")
        _expect(err["code"] == want_status, where, f"error.code is {err['code']!r}, expected {want_status}")
    return err


async def check_errors(session: aiohttp.ClientSession, base_url: str, model: str) -> None:
    """vLLM-shaped errors: unknown model 404, malformed JSON 400, prompt over max_model_len 400."""
    unknown = f"{model}-does-not-exist"
    for path, body in (
        ("/v1/completions", {"model": unknown, "prompt": PROMPT, "max_tokens": 1}),
        ("/v1/chat/completions", {"model": unknown, "messages": list(MESSAGES), "max_tokens": 1}),
    ):
        where = f"POST {path} (unknown model)"
        status, _, raw = await _post(session, f"{base_url}{path}", body)
        err = _check_error(status, raw, 404, "NotFoundError", where)
        _expect(unknown in err["message"], where, f"message does not name the model: {err['message']!r}")

    for path in ("/v1/completions", "/v1/chat/completions"):
        where = f"POST {path} (malformed JSON)"
        status, _, raw = await _post(session, f"{base_url}{path}", b'{"model": "x", "prompt": ')
        _check_error(status, raw, 400, None, where)

    where = "POST /v1/completions (prompt longer than max_model_len)"
    mml = (await _model_card(session, base_url, model))["max_model_len"]
    _expect(_is_int(mml) and mml > 0, where, f"max_model_len {mml!r} is not a positive integer")
    body = {"model": model, "prompt": [1] * (mml + 10), "max_tokens": 1}
    status, _, raw = await _post(session, f"{base_url}/v1/completions", body)
    err = _check_error(status, raw, 400, "BadRequestError", where)
    _expect("context length" in err["message"], where, f"message does not mention the context length: {err}")


def _families(text: str, where: str) -> dict[str, Metric]:
    try:
        return {f.name: f for f in text_string_to_metric_families(text)}
    except (ValueError, IndexError, TypeError) as err:
        raise _fail(where, f"prometheus_client cannot parse the exposition: {err}") from None


def _family(fams: dict[str, Metric], name: str, kind: str, where: str) -> Metric:
    fam = fams.get(name)
    if fam is None:
        raise _fail(where, f"no {name} {kind}")
    _expect(fam.type == kind, where, f"{name} is a {fam.type}, expected a {kind}")
    _expect(bool(fam.samples), where, f"{name} has no samples")
    return fam


async def _scrape(session: aiohttp.ClientSession, base_url: str, where: str) -> str:
    async with session.get(f"{base_url}/metrics") as r:
        _expect(r.status == 200, where, f"HTTP {r.status}, expected 200")
        ctype = r.headers.get("Content-Type", "")
        _expect(ctype.startswith("text/plain"), where, f"Content-Type {ctype!r}, expected text/plain")
        return await r.text()


def _scraped(text: str, where: str) -> ServerMetrics:
    try:
        return parse_vllm_metrics(text)
    except ScrapeError as err:
        raise _fail(where, f"llmpool's scraper rejects the exposition: {err}") from None


def _generation_tokens(text: str, where: str) -> float:
    return sum(e.generation_tokens for e in _scraped(text, where).engines.values())


async def check_metrics(session: aiohttp.ClientSession, base_url: str, model: str) -> None:
    """/metrics: parses with prometheus_client and with llmpool's scraper; vLLM V1's names,
    types and labels; generation_tokens_total grows after a request."""
    where = "GET /metrics"
    text = await _scrape(session, base_url, where)
    fams = _families(text, where)
    for name in GAUGES:
        fam = _family(fams, name, "gauge", where)
        for s in fam.samples:
            _expect(set(s.labels) == PER_ENGINE_LABELS, where, f"{name} has labels {sorted(s.labels)}")
        names = {s.labels["model_name"] for s in fam.samples}
        _expect(model in names, where, f"{name} has model_name {sorted(names)}, expected {model!r}")
    for name in COUNTERS:
        # prometheus_client names a counter family without '_total'; the samples keep it.
        fam = _family(fams, name, "counter", where)
        totals = [s for s in fam.samples if s.name == name + "_total"]
        _expect(bool(totals), where, f"{name} has no {name}_total sample")
        for s in totals:
            _expect(set(s.labels) >= PER_ENGINE_LABELS, where, f"{name}_total has labels {sorted(s.labels)}")
    reasons = {s.labels.get("finished_reason") for s in fams["vllm:request_success"].samples}
    _expect({"stop", "length", "abort"} <= reasons, where, f"request_success has finished_reason {reasons}")
    ttft = _family(fams, "vllm:time_to_first_token_seconds", "histogram", where)
    les = sorted({float(s.labels["le"]) for s in ttft.samples if s.name.endswith("_bucket")} - {float("inf")})
    _expect(tuple(les) == TTFT_BUCKETS, where, f"TTFT buckets {les} are not vLLM's")
    for s in _family(fams, "vllm:cache_config_info", "gauge", where).samples:
        for label in ("block_size", "num_gpu_blocks", "engine"):
            _expect(label in s.labels, where, f"cache_config_info lacks label {label!r}")
        for label in ("block_size", "num_gpu_blocks"):
            _expect(s.labels[label].isdigit(), where, f"cache_config_info {label}={s.labels[label]!r}")
    sm = _scraped(text, where)
    _expect(model in sm.model_names, where, f"scraper sees model names {sorted(sm.model_names)}")
    _expect("0" in sm.engines, where, f"scraper sees engines {sorted(sm.engines)}, expected '0'")
    e0 = sm.engines["0"]
    _expect(
        e0.block_size is not None and e0.num_gpu_blocks is not None, where, "scraper found no KV geometry"
    )

    before = _generation_tokens(text, where)
    await _ok_json(
        session,
        f"{base_url}/v1/completions",
        {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True},
        where + " (request)",
    )
    # vLLM records stats per output batch in the API server; allow it a moment.
    deadline = time.monotonic() + 10.0
    while True:
        after = _generation_tokens(await _scrape(session, base_url, where), where)
        if after >= before + MAX_TOKENS or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    msg = f"generation_tokens_total went {before:g} -> {after:g} after a {MAX_TOKENS}-token request"
    _expect(after >= before + MAX_TOKENS, where, msg)


CHECKS: dict[str, Check] = {
    "health": check_health,
    "models": check_models,
    "completion": check_completion,
    "chat": check_chat,
    "stream_completion": check_stream_completion,
    "stream_chat": check_stream_chat,
    "no_usage_without_option": check_no_usage_without_option,
    "errors": check_errors,
    "metrics": check_metrics,
}
"""Every contract check by name (the real-vLLM tier parametrizes over these)."""
