"""OpenAI request and response bodies as the picker sees them.

Requests: ``/v1/completions`` and ``/v1/chat/completions`` bodies are parsed once with
orjson into what routing needs (model, prompt token count, prompt-prefix block hashes,
max tokens, streaming). Prompt tokens are exact for token-id prompts and when the served
model's tokenizer is configured (the ``tokenizers`` package); otherwise they are
estimated from the prompt's size in bytes, which the director corrects online by the
servers' own counts (``usage.prompt_tokens``). A body is re-serialised only when the
picker has to change it: a model-name rewrite, or asking a streamed request for its
usage chunk.

Responses: :class:`ResponseTap` watches the response body on its way back to the
client: it counts streamed tokens (one per content chunk: vLLM sends one chunk per
generated token), reads ``usage`` from a JSON body or the final SSE chunk, and when the
picker asked for ``include_usage`` on the client's behalf, removes that extra chunk so
the client receives exactly what it asked for. Without such a change, chunks pass
through byte for byte, immediately.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from llmpool import tokens

#: Prefix hashes cover blocks of about 64 tokens: 64 token ids, or 256 bytes of prompt text
#: (about four bytes per token). vLLM hashes full KV blocks of 16 tokens; the GIE
#: approximate prefix scorer clamps its block to 64 tokens.
PREFIX_BLOCK_TOKENS = 64
PREFIX_BLOCK_BYTES = 256
_MAX_PREFIX_BLOCKS = 256  # hash at most the first ~16k tokens
#: Bytes per token of the estimate; the director corrects it online from the servers' usage.
BYTES_PER_TOKEN = 4.0
#: Tokens a chat template adds per message and to open the reply (generic template).
CHAT_TOKENS_PER_MESSAGE = tokens.CHAT_TOKENS_PER_MESSAGE
CHAT_TOKENS_REPLY = tokens.CHAT_TOKENS_REPLY


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
    exact_tokens: bool = False  # token ids or a real tokenizer, not an estimate
    text: str = ""  # the prompt as text (chat: roles and contents, one per line); for length predictors
    prompt_hash: int = 0  # of the whole prompt (its text, or its token ids): ExactMatch's identity


TokenCounter = Callable[[str], list[int] | None]
"""Returns token ids for a text, or None when no tokenizer is configured."""


def _signed(digest: bytes) -> int:
    return int.from_bytes(digest, "little", signed=True)


def prefix_chain(data: bytes, block: int) -> tuple[tuple[int, ...], int]:
    """Hashes of ``data``'s prefixes that end on a ``block`` boundary (at most
    ``_MAX_PREFIX_BLOCKS``), and the hash of the whole of ``data``: one pass, one BLAKE2b state
    (a prefix's hash is the running state's digest at that point)."""
    h = hashlib.blake2b(digest_size=8)
    view = memoryview(data)
    n = min(len(data) // block, _MAX_PREFIX_BLOCKS)
    out = []
    for b in range(n):
        h.update(view[b * block : (b + 1) * block])
        out.append(_signed(h.copy().digest()))
    h.update(view[n * block :])
    return tuple(out), _signed(h.digest())


def text_prefix_hashes(data: bytes) -> tuple[int, ...]:
    """Hashes of a prompt's prefixes of whole :data:`PREFIX_BLOCK_BYTES` blocks of its bytes."""
    return prefix_chain(data, PREFIX_BLOCK_BYTES)[0]


def _id_bytes(ids: list[int]) -> bytes:
    try:
        return array("q", ids).tobytes()
    except OverflowError:
        raise BadRequestError("'prompt' token ids must be integers of at most 64 bits") from None


def id_prefix_hashes(ids: list[int]) -> tuple[int, ...]:
    """Hashes of a token-id prompt's prefixes of whole :data:`PREFIX_BLOCK_TOKENS` blocks."""
    return prefix_chain(_id_bytes(ids), PREFIX_BLOCK_TOKENS * 8)[0]


def estimate_tokens(nbytes: int) -> int:
    return int(nbytes / BYTES_PER_TOKEN + 0.999) if nbytes else 0


def _int_field(body: dict[str, Any], name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise BadRequestError(f"'{name}' must be a non-negative integer")
    return v


def parse_request(raw: bytes, *, chat: bool, tokenize: TokenCounter | None = None) -> ParsedRequest:
    """Parse an OpenAI completions (``chat=False``) or chat-completions body.

    Cost is linear in the prompt but small: one orjson parse, one UTF-8 encode and a hash
    per 256 bytes; no tokenizer unless one is configured."""
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
    ids: list[int] | None = None
    extra = 0
    if chat:
        text = _chat_text(body.get("messages"))
        extra = CHAT_TOKENS_PER_MESSAGE * len(body["messages"]) + CHAT_TOKENS_REPLY
    else:
        text, ids = _prompt(body.get("prompt"))
    if ids is None and tokenize is not None:
        ids = tokenize(text)
        extra = 0
    if ids is not None:
        n_tokens, exact = len(ids) + extra, True
        hashes, whole = prefix_chain(_id_bytes(ids), PREFIX_BLOCK_TOKENS * 8)
    else:
        data = text.encode("utf-8", "surrogatepass")
        n_tokens, exact = estimate_tokens(len(data)) + extra, False
        hashes, whole = prefix_chain(data, PREFIX_BLOCK_BYTES)
    max_tokens = _int_field(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int_field(body, "max_tokens")
    stream = body.get("stream") is True
    opts = body.get("stream_options")
    include_usage = stream and isinstance(opts, dict) and opts.get("include_usage") is True
    return ParsedRequest(
        model=model,
        prompt_tokens=n_tokens,
        prefix_hashes=hashes,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
        chat=chat,
        body=body,
        exact_tokens=exact,
        text=text,
        prompt_hash=whole,
    )


def _chat_text(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise BadRequestError("'messages' must be a non-empty list")
    parts: list[str] = []
    for msg in messages:
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise BadRequestError("invalid 'messages': each message needs a string 'role'")
        try:
            content = tokens.message_text(msg.get("content"))
        except TypeError as err:
            raise BadRequestError(f"invalid 'messages': {err}") from None
        parts.append(msg["role"])
        parts.append(content)
    return "\n".join(parts)


def _prompt(prompt: Any) -> tuple[str, list[int] | None]:
    """A completions ``prompt`` as text, or as token ids when it is given as ids."""
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return "", list(prompt)
        if isinstance(first, str) and all(isinstance(p, str) for p in prompt):
            return "".join(prompt), None  # a batch: routed by its whole size, prefix of the first
        if isinstance(first, list) and all(
            isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
            for p in prompt
        ):
            return "", [t for p in prompt for t in p]
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
