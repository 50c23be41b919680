"""The emulator's HTTP face: vLLM 0.32's OpenAI-compatible API and ``/metrics``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with SSE
streaming, ``stream_options.include_usage`` and ``[DONE]``), ``GET /v1/models``,
``/health``, ``/version``, ``/metrics``. Response and error bodies have vLLM's shapes
(see the captures under tests/fixtures/vllm-0.32). Prompt tokens are counted with
:mod:`llmpool.tokens` (a token-id prompt counts exactly).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from llmpool import __version__, tokens
from llmpool.emulator.lengths import OUTPUT_TOKENS_HEADER, OutputLengths
from llmpool.emulator.runtime import RealtimeEngine, Stream
from llmpool.emulator.vllm_metrics import CONTENT_TYPE
from llmpool.routing.profile import Profile, load_profile

FINGERPRINT = f"llmpool-emulator-{__version__}"
_WORDS = (
    " the", " model", " answers", " with", " a", " steady", " stream", " of", " plain", " words",
    " and", " each", " one", " is", " exactly", " one", " token", " long", ".", "\n",
)  # fmt: skip


@dataclass
class EmulatorConfig:
    """Everything that shapes one emulated server."""

    model: str = "emulated-llm"
    profile: str | Profile = "a100-llama3-8b"
    time_scale: float = 1.0
    max_model_len: int | None = None  # default: min(8192, KV capacity - one block)
    engine_overrides: dict[str, int | bool] = field(default_factory=dict)
    lengths: OutputLengths | None = None
    seed: int = 0


class _BadRequest(Exception):
    def __init__(self, message: str, *, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


def _error(message: str, status: int, param: str | None = None) -> web.Response:
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _int_field(body: dict[str, Any], name: str, *, minimum: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _BadRequest(f"'{name}' must be an integer, got {orjson.dumps(v).decode()[:40]}", param=name)
    if v < minimum:
        raise _BadRequest(f"'{name}' must be at least {minimum}, got {v}", param=name)
    return v


class EmulatorApp:
    """The aiohttp application of one emulated vLLM server."""

    def __init__(self, cfg: EmulatorConfig) -> None:
        profile = load_profile(cfg.profile) if isinstance(cfg.profile, str) else cfg.profile
        ecfg = profile.engine.with_overrides(**cfg.engine_overrides)
        capacity = ecfg.num_gpu_blocks * ecfg.block_size - ecfg.block_size
        max_len = cfg.max_model_len or min(8192, capacity)
        if max_len > capacity:
            raise ValueError(
                f"max_model_len {max_len} exceeds the KV cache ({capacity} tokens); "
                "raise num_gpu_blocks or lower max_model_len"
            )
        self.cfg = cfg
        self.profile = profile
        self.model = cfg.model
        self.max_model_len = max_len
        self.lengths = cfg.lengths or OutputLengths(seed=cfg.seed)
        self.engine = RealtimeEngine(
            profile,
            model_name=cfg.model,
            max_model_len=max_len,
            time_scale=cfg.time_scale,
            engine_overrides=cfg.engine_overrides,
        )
        self.created = int(time.time())
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/metrics", self.metrics)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        self.app = app

    async def _on_startup(self, _app: web.Application) -> None:
        self.engine.start()

    async def _on_cleanup(self, _app: web.Application) -> None:
        await self.engine.stop()

    # ------------------------------------------------------------------ small routes
    async def health(self, _req: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(self, _req: web.Request) -> web.Response:
        return web.json_response({"version": FINGERPRINT})

    async def metrics(self, _req: web.Request) -> web.Response:
        return web.Response(body=self.engine.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def models(self, _req: web.Request) -> web.Response:
        card = {
            "id": self.model,
            "object": "model",
            "created": self.created,
            "owned_by": "vllm",
            "root": self.model,
            "parent": None,
            "max_model_len": self.max_model_len,
            "permission": [
                {
                    "id": f"modelperm-{secrets.token_hex(8)}",
                    "object": "model_permission",
                    "created": self.created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }
        return web.Response(
            body=orjson.dumps({"object": "list", "data": [card]}), content_type="application/json"
        )

    # ------------------------------------------------------------------ generation
    async def completions(self, req: web.Request) -> web.StreamResponse:
        return await self._generate(req, chat=False)

    async def chat(self, req: web.Request) -> web.StreamResponse:
        return await self._generate(req, chat=True)

    async def _parse(
        self, req: web.Request, chat: bool
    ) -> tuple[dict[str, Any], int, tuple[int, ...], int, int]:
        raw = await req.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as err:
            raise _BadRequest(f"malformed JSON body: {err}") from None
        if not isinstance(body, dict):
            raise _BadRequest("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model:
            raise _BadRequest(
                f"The model `{model}` does not exist. Valid aliases: {self.model}.", status=404, param="model"
            )
        bs = self.engine.cfg.block_size
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _BadRequest("'messages' must be a non-empty list of messages", param="messages")
            try:
                units: list[Any] = tokens.chat_pieces(messages)
            except TypeError as err:
                raise _BadRequest(str(err), param="messages") from None
        else:
            units = self._prompt_units(body.get("prompt"))
        prompt = len(units)
        if prompt == 0:
            raise _BadRequest("the prompt is empty", param="prompt")
        n = _int_field(body, "n", minimum=1) or 1
        if n > 1:
            raise _BadRequest("n > 1 is not supported by the emulator", param="n")
        if prompt >= self.max_model_len:
            raise _BadRequest(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"prompt contains at least {prompt} input tokens. Please reduce the length of the input "
                "prompt.",
                param="input_tokens",
            )
        names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
        max_tokens = None
        for name in names:
            max_tokens = _int_field(body, name, minimum=1)
            if max_tokens is not None:
                break
        room = self.max_model_len - prompt
        if max_tokens is None:
            max_tokens = room if chat else 16
        if max_tokens > room:
            raise _BadRequest(
                f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
                f"context length is {self.max_model_len} tokens and your request has {prompt} input tokens "
                f"({max_tokens} > {self.max_model_len} - {prompt}).",
                param="max_tokens",
            )
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise _BadRequest("'ignore_eos' must be a boolean", param="ignore_eos")
        if ignore_eos:
            output = max_tokens
        else:
            hinted = req.headers.get(OUTPUT_TOKENS_HEADER)
            if hinted is not None:
                try:
                    output = int(hinted)
                except ValueError:
                    raise _BadRequest(
                        f"header {OUTPUT_TOKENS_HEADER} must be an integer, got {hinted!r}"
                    ) from None
                if output < 1:
                    raise _BadRequest(f"header {OUTPUT_TOKENS_HEADER} must be >= 1, got {output}")
            else:
                output = self.lengths.draw()
            output = min(output, max_tokens)
        hashes = tokens.block_hashes(units, bs) if self.engine.cfg.enable_prefix_caching else ()
        return body, prompt, hashes, output, max_tokens

    @staticmethod
    def _prompt_units(prompt: Any) -> list[Any]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return tokens.pieces(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
            raise _BadRequest(
                "batched prompts are not supported by the emulator; send one prompt", param="prompt"
            )
        raise _BadRequest(
            "'prompt' must be a string, a list of token ids, or a list of one of those", param="prompt"
        )

    async def _generate(self, req: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body, prompt, hashes, output, max_tokens = await self._parse(req, chat)
        except _BadRequest as err:
            return _error(str(err), err.status, err.param)
        if not self.engine.fits(prompt, output):
            return _error(
                f"the request needs {prompt + output} KV tokens, more than this server's KV cache holds",
                400,
                "max_tokens",
            )
        stream = self.engine.submit(prompt, output, hashes, max_tokens=max_tokens)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(8)
        try:
            if body.get("stream") is True:
                opts = body.get("stream_options")
                usage = isinstance(opts, dict) and opts.get("include_usage") is True
                return await self._stream(req, stream, rid, chat=chat, include_usage=usage)
            return await self._whole(stream, rid, chat=chat)
        finally:
            if not stream.done:
                self.engine.abort(stream)

    def _usage(self, s: Stream) -> dict[str, Any]:
        return {"prompt_tokens": s.prompt_tokens, "total_tokens": s.prompt_tokens + s.generated,
                "completion_tokens": s.generated}  # fmt: skip

    @staticmethod
    def _text(s: Stream, start: int, end: int) -> str:
        base = s.ereq.rid
        return "".join(_WORDS[(base + i) % len(_WORDS)] for i in range(start, end))

    async def _whole(self, s: Stream, rid: str, *, chat: bool) -> web.Response:
        while not s.done:
            await s.changed.wait()
            s.changed.clear()
        text = self._text(s, 0, s.generated)
        created = int(time.time())
        usage = {**self._usage(s), "prompt_tokens_details": None, "completion_tokens_details": None}
        if chat:
            body: dict[str, Any] = {
                "id": rid, "object": "chat.completion", "created": created, "model": self.model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None, "annotations": None,
                                "audio": None, "function_call": None, "reasoning": None},
                    "logprobs": None, "finish_reason": s.reason, "stop_reason": None, "token_ids": None,
                    "routed_experts": None,
                }],
                "service_tier": None, "system_fingerprint": FINGERPRINT, "usage": usage,
                "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None,
                "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
            }  # fmt: skip
        else:
            body = {
                "id": rid, "object": "text_completion", "created": created, "model": self.model,
                "choices": [{
                    "index": 0, "text": text, "logprobs": None, "finish_reason": s.reason,
                    "stop_reason": None, "token_ids": None, "prompt_logprobs": None, "prompt_token_ids": None,
                    "routed_experts": None,
                }],
                "service_tier": None, "system_fingerprint": FINGERPRINT, "usage": usage,
                "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
            }  # fmt: skip
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def _stream(
        self, req: web.Request, s: Stream, rid: str, *, chat: bool, include_usage: bool
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache"})  # fmt: skip
        await resp.prepare(req)
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": rid, "object": obj, "created": created, "model": self.model}

        async def send(payload: dict[str, Any]) -> None:
            await resp.write(b"data: " + orjson.dumps(payload) + b"\n\n")

        sent = 0
        role_sent = not chat
        while True:
            done = s.done
            gen = s.generated
            if not role_sent and (gen > 0 or done):
                # vLLM sends the role chunk with the first engine output, not on arrival.
                await send({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}],
                            "prompt_token_ids": None, "prompt_text": None})  # fmt: skip
                role_sent = True
            if gen > sent:
                text = self._text(s, sent, gen)
                reason = s.reason if done and s.reason != "abort" else None
                choice: dict[str, Any]
                if chat:
                    # Chat chunks carry stop_reason only on the finishing chunk (as vLLM's do).
                    choice = {
                        "index": 0,
                        "delta": {"content": text},
                        "logprobs": None,
                        "finish_reason": reason,
                    }
                    if reason is not None:
                        choice["stop_reason"] = None
                    choice["token_ids"] = None
                else:
                    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason,
                              "stop_reason": None, "prompt_token_ids": None, "token_ids": None}  # fmt: skip
                await send({**head, "choices": [choice]})
                sent = gen
            if done:
                break
            await s.changed.wait()
            s.changed.clear()
        if include_usage:
            await send({**head, "choices": [], "usage": self._usage(s), "system_fingerprint": FINGERPRINT})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


@dataclass(frozen=True)
class Served:
    url: str
    emulator: EmulatorApp


@contextlib.asynccontextmanager
async def running(cfg: EmulatorConfig, *, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[Served]:
    """Serve one emulator in the current event loop until the block exits."""
    emu = EmulatorApp(cfg)
    runner = web.AppRunner(emu.app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    url = f"http://{host}:{runner.addresses[0][1]}"
    try:
        yield Served(url, emu)
    finally:
        await runner.cleanup()


async def serve_forever(
    cfg: EmulatorConfig, *, host: str, port: int, ready: asyncio.Event | None = None
) -> None:
    async with running(cfg, host=host, port=port) as served:
        print(f"llmpool emulate: serving {cfg.model!r} on {served.url} (profile {cfg.profile}, "
              f"time scale {cfg.time_scale:g})", flush=True)  # fmt: skip
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
