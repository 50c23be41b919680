"""A fast, deterministic prompt-token estimate used where no real tokenizer is configured.

BPE tokenizers of current LLMs average about four characters of English per token,
split words into pieces and give most punctuation a token of its own. The estimate
mirrors that: a run of up to five word characters (with its leading space) is one
token, and so is each other non-space character. It is what the emulator counts;
`llmpool calibrate` reports how far it is from a real server's counts. (The picker,
which must stay cheap on 100k-token prompts, estimates from the byte size instead and
corrects that by the servers' usage counts.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

_PIECE = re.compile(r" ?\w{1,5}|[^\w\s]|\s+")

#: Tokens a chat template adds around each message and to open the reply.
CHAT_TOKENS_PER_MESSAGE = 4
CHAT_TOKENS_REPLY = 2


def pieces(text: str) -> list[str]:
    """The estimate's token pieces of ``text`` (whitespace runs count as one piece)."""
    return _PIECE.findall(text)


def count_text(text: str) -> int:
    """Estimated token count of ``text`` (0 for the empty string)."""
    return len(_PIECE.findall(text))


def message_text(content: Any) -> str:
    """The text of an OpenAI chat message's ``content`` (a string or a list of parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
        return "\n".join(out)
    raise TypeError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def chat_pieces(messages: Sequence[Any]) -> list[str]:
    """Token pieces of a chat conversation under a generic template: each message is
    wrapped in role markers, and the reply is opened at the end."""
    out: list[str] = []
    for msg in messages:
        if not isinstance(msg, dict):
            raise TypeError("each message must be an object with 'role' and 'content'")
        role = msg.get("role")
        if not isinstance(role, str):
            raise TypeError("each message needs a string 'role'")
        out.append("<|start|>")
        out.append(role)
        out.append("\n")
        out.extend(pieces(message_text(msg.get("content"))))
        out.append("<|end|>")
    out.append("<|start|>")
    out.append("assistant")
    return out


def block_hashes(units: Iterable[object], block: int) -> tuple[int, ...]:
    """Chained hashes of the full ``block``-unit chunks of a token sequence, as vLLM's
    prefix cache hashes full KV blocks (each hash covers everything before it)."""
    out: list[int] = []
    chunk: list[object] = []
    prev = 0
    for u in units:
        chunk.append(u)
        if len(chunk) == block:
            prev = hash((prev, *chunk))
            out.append(prev)
            chunk.clear()
    return tuple(out)
