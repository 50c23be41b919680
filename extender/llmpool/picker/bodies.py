"""OpenAI request and response bodies as the picker sees them.

Requests: ``/v1/completions`` and ``/v1/chat/completions`` bodies are parsed once with
orjson into what routing needs (model, prompt token count, prompt-prefix block hashes,
max tokens, streaming). Prompt tokens come from the served model's tokenizer when one
is configured (the ``tokenizers`` package), otherwise from :mod:`llmpool.tokens`'s
estimate. A body is re-serialised only when the picker has to change it: a model-name
rewrite, or asking a streamed request for its usage chunk.

Responses: :class:`ResponseTap` watches the response body on its way back to the
client: it counts streamed tokens (one per content chunk: vLLM sends one chunk per
generated token), reads ``usage`` from a JSON body or the final SSE chunk, and when the
picker asked for ``include_usage`` on the client's behalf, removes that extra chunk so
the client receives exactly what it asked for. Without such a change, chunks pass
through byte for byte, immediately.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from llmpool import tokens

#: Block size (tokens) of the prefix hashes the picker derives from prompts. vLLM
#: hashes full KV blocks of 16 tokens; the GIE approximate prefix scorer clamps to 64.
PREFIX_BLOCK_TOKENS = 64
_MAX_PREFIX_BLOCKS = 256  # hash at most the first 16k tokens


class BadRequestError(ValueError):
    """The request body cannot be routed; ``str(err)`` is the client-facing one-liner."""


@dataclass(slots=True)
class ParsedRequest:
    model: str
    prompt_tokens: int
    prefix_hashes: tuple[int, ...]
    max_tokens: int | None
    stream: bool
    include_usage: bool  # the client asked for streamed usage itself
    chat: bool
    body: dict[str, Any]


TokenCounter = Callable[[str], list[int] | None]
"""Returns token ids for a text, or None when no tokenizer is configured."""


def _stable_hash(prev: int, chunk: tuple[object, ...]) -> int:
    h = hashlib.blake2b(repr((prev, chunk)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little", signed=True)


def prefix_hashes(units: list[Any], block: int = PREFIX_BLOCK_TOKENS) -> tuple[int, ...]:
    """Chained hashes of the full ``block``-unit chunks of a prompt (stable across processes)."""
    out: list[int] = []
    prev = 0
    limit = min(len(units) // block, _MAX_PREFIX_BLOCKS)
    for b in range(limit):
        prev = _stable_hash(prev, tuple(units[b * block : (b + 1) * block]))
        out.append(prev)
    return tuple(out)


def _int_field(body: dict[str, Any], name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise BadRequestError(f"'{name}' must be a non-negative integer")
    return v


def parse_request(raw: bytes, *, chat: bool, tokenize: TokenCounter | None = None) -> ParsedRequest:
    """Parse an OpenAI completions (``chat=False``) or chat-completions body."""
    if not raw:
        raise BadRequestError("empty request body")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise BadRequestError(f"request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise BadRequestError("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequestError("model not found in request body")
    units: list[Any]
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequestError("'messages' must be a non-empty list")
        try:
            units = tokens.chat_pieces(messages)
        except TypeError as err:
            raise BadRequestError(f"invalid 'messages': {err}") from None
        text = None
        if tokenize is not None:
            text = "".join(units)
    else:
        prompt = body.get("prompt")
        units, text = _prompt_units(prompt)
    ids = tokenize(text) if tokenize is not None and text is not None else None
    if ids is not None:
        units = ids
    max_tokens = _int_field(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int_field(body, "max_tokens")
    stream = body.get("stream") is True
    opts = body.get("stream_options")
    include_usage = stream and isinstance(opts, dict) and opts.get("include_usage") is True
    return ParsedRequest(
        model=model,
        prompt_tokens=len(units),
        prefix_hashes=prefix_hashes(units),
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
        chat=chat,
        body=body,
    )


def _prompt_units(prompt: Any) -> tuple[list[Any], str | None]:
    """Token units of a completions ``prompt`` and its text (None for token ids)."""
    if isinstance(prompt, str):
        return tokens.pieces(prompt), prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt), None
        if isinstance(first, str) and all(isinstance(p, str) for p in prompt):
            # a batch of prompts: route by the whole batch's size, prefix of the first
            units = [u for p in prompt for u in tokens.pieces(p)]
            return units, "".join(prompt)
        if isinstance(first, list) and all(isinstance(p, list) for p in prompt):
            return [u for p in prompt for u in p], None
    raise BadRequestError("'prompt' must be a string, a list of strings or a list of token ids")


def rewrite_body(parsed: ParsedRequest, *, model: str | None, ask_usage: bool) -> bytes | None:
    """The body to forward if the picker changes it (None: forward the original bytes)."""
    if model is None and not ask_usage:
        return None
    body = dict(parsed.body)
    if model is not None:
        body["model"] = model
    if ask_usage:
        opts = body.get("stream_options")
        opts = dict(opts) if isinstance(opts, dict) else {}
        opts["include_usage"] = True
        body["stream_options"] = opts
    return orjson.dumps(body)


# ------------------------------------------------------------------------------------------
# Responses
# ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = -1
    completion_tokens: int = -1
    cached_tokens: int = -1


def _usage_of(obj: Any) -> Usage | None:
    if not isinstance(obj, dict):
        return None
    u = obj.get("usage")
    if not isinstance(u, dict):
        return None
    out = Usage()
    for name in ("prompt_tokens", "completion_tokens"):
        v = u.get(name)
        if isinstance(v, int) and not isinstance(v, bool):
            setattr(out, name, v)
    details = u.get("prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        out.cached_tokens = details["cached_tokens"]
    return out if out.completion_tokens >= 0 else None


class ResponseTap:
    """Watches one response body. Feed every chunk to :meth:`feed`; it returns the bytes to
    pass on to the client (the same object when nothing changes)."""

    __slots__ = ("_buf", "_tail", "chunks", "generated", "model_back", "sse", "strip_usage", "usage")

    def __init__(self, *, sse: bool, strip_usage: bool = False, model_back: tuple[str, str] | None = None):
        self.sse = sse
        self.strip_usage = strip_usage and sse
        self.model_back = model_back  # (name sent upstream, client's name): rewrite back
        self.usage: Usage | None = None
        self.generated = 0  # content chunks seen (streamed tokens)
        self.chunks = 0
        self._tail = b""
        self._buf: list[bytes] = []

    def feed(self, chunk: bytes, end: bool) -> bytes:
        self.chunks += 1
        if not self.sse:
            return self._feed_json(chunk, end)
        data = self._tail + chunk if self._tail else chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._tail = data
            complete = b""
        else:
            complete = data[: cut + 2]
            self._tail = data[cut + 2 :]
        out = self._events(complete) if complete else b""
        if not self.strip_usage and self.model_back is None:
            if end:
                self._tail = b""
            return chunk  # byte-exact pass-through; parsing was on the side
        if end and self._tail:
            out += self._tail
            self._tail = b""
        return out

    def _events(self, complete: bytes) -> bytes:
        """Parse complete SSE events; return them as they should reach the client."""
        keep: list[bytes] | None = [] if (self.strip_usage or self.model_back) else None
        for event in complete.split(b"\n\n"):
            if not event:
                continue
            if event.startswith(b"data: {"):
                is_usage = False
                if b'"finish_reason"' in event and b'"delta":{"role"' not in event:
                    self.generated += 1  # one chunk per token (a chat stream's role chunk is none)
                if b'"usage":{' in event or b'"usage": {' in event:
                    try:
                        u = _usage_of(orjson.loads(event[6:]))
                    except orjson.JSONDecodeError:
                        u = None
                    if u is not None:
                        self.usage = u
                        is_usage = b'"choices":[]' in event or b'"choices": []' in event
                if keep is not None:
                    if is_usage and self.strip_usage:
                        continue
                    if self.model_back is not None:
                        event = _swap_model(event, *self.model_back)
            if keep is not None:
                keep.append(event + b"\n\n")
        return b"".join(keep) if keep is not None else b""

    def _feed_json(self, chunk: bytes, end: bool) -> bytes:
        self._buf.append(chunk)
        if not end:
            return b"" if self.model_back is not None else chunk
        raw = b"".join(self._buf)
        self._buf = []
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        self.usage = _usage_of(obj)
        if self.model_back is None:
            return chunk
        if isinstance(obj, dict) and obj.get("model") == self.model_back[0]:
            obj["model"] = self.model_back[1]
            return orjson.dumps(obj)
        return raw

    @property
    def completion_tokens(self) -> int:
        """Usage's completion tokens if seen, else the streamed count."""
        return self.usage.completion_tokens if self.usage is not None else self.generated


def _swap_model(event: bytes, sent: str, client: str) -> bytes:
    needle = b'"model":' + orjson.dumps(sent)
    if needle not in event:
        return event
    return event.replace(needle, b'"model":' + orjson.dumps(client), 1)
