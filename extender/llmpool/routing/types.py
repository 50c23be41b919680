"""The routing data model shared by the simulator, the emulator and the live picker.

Everything here is plain data with no I/O. Times are seconds as floats on the
driver's clock (virtual time in the simulator, ``time.monotonic()`` live).

A policy sees a :class:`Request` (what the router knows about a new request: never
its true output length) and a :class:`PoolView`: one :class:`EndpointState` per
routable endpoint plus the router-side queue of held requests. The driver owns the
``EndpointState`` objects and updates them in place, so a decision allocates
nothing per endpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final


@dataclass(slots=True)
class LengthPrediction:
    """What a length predictor says about a request's output length.

    ``bucket_edges`` are the upper edges of all but the last bucket (default
    ``(256, 2048)`` gives the buckets 0-256, 256-2048 and >=2048 tokens);
    ``bucket_probs`` has one more entry than ``bucket_edges``.
    """

    expected_tokens: float
    bucket_edges: tuple[int, ...] = (256, 2048)
    bucket_probs: tuple[float, ...] = ()
    source: str = ""


@dataclass(slots=True)
class Request:
    """A request as the router sees it on arrival.

    ``prefix_hashes`` identify the prompt's leading blocks of ``hash_block_tokens``
    tokens each, as a chain: equal values at the same position mean a shareable
    prefix (the Mooncake trace's ``hash_ids``; the picker derives them from the
    prompt text). ``max_tokens`` is what the client asked for, if anything.
    ``stream``: the response is streamed, so the router sees its first token when it
    comes (the lab's requests behave as streamed).
    """

    id: int
    arrival: float
    prompt_tokens: int
    model: str = "default"
    max_tokens: int | None = None
    prompt_text: str | None = None
    prompt_hash: int | None = None
    prefix_hashes: tuple[int, ...] = ()
    hash_block_tokens: int = 512
    priority: int = 0
    task: str = ""
    stream: bool = True
    prediction: LengthPrediction | None = None


@dataclass(slots=True)
class ActiveRequest:
    """A request the router assigned to an endpoint and has not seen finish."""

    request: Request
    assigned_at: float
    generated_tokens: int = 0  # output tokens observed so far (streamed responses)
    first_token_at: float | None = None


@dataclass(slots=True)
class EndpointState:
    """One routable endpoint (``podIP:port``; one data-parallel rank of an engine).

    Two kinds of fields:

    * *scraped* -- the engine's own gauges, as of ``scraped_at`` (the picker scrapes
      ``/metrics`` every 50 ms by default; the simulator refreshes at the same
      interval): ``running``, ``waiting``, ``kv_usage``, ``kv_capacity_tokens``;
    * *router-side* -- exact and fresh, from the router's own assignments:
      ``inflight`` requests, ``inflight_prompt_tokens``, ``pending_since_scrape``
      (requests assigned after ``scraped_at``, which the gauges cannot show yet) and
      their prompt tokens ``pending_tokens_since_scrape``, the output tokens seen so
      far for the in-flight requests ``inflight_output_tokens`` (the picker counts
      streamed tokens; the simulator refreshes it with each scrape), and
      ``prefill_pending_tokens``: the prompt tokens of the in-flight requests that have
      shown no output token yet, i.e. prefill work queued or running on the endpoint
      (the picker sees first tokens of streamed responses; a non-streamed request is not
      counted, since its first token is only seen at the end).

    ``group`` names the engine (pod) the endpoint belongs to: endpoints sharing a
    group are the data-parallel ranks of one barrier-coupled engine; ``rank`` is the
    endpoint's index inside it.
    """

    index: int
    name: str
    group: str = ""
    rank: int = 0
    # scraped
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    kv_capacity_tokens: int = 0
    scraped_at: float = float("-inf")
    stale: bool = False
    scrape_epoch: int = 0  # scrapes so far (see llmpool.routing.driver)
    # router-side
    inflight: int = 0
    inflight_prompt_tokens: int = 0
    pending_since_scrape: int = 0
    pending_tokens_since_scrape: int = 0
    inflight_output_tokens: int = 0  # output tokens seen so far for the in-flight requests
    prefill_pending_tokens: int = 0  # prompt tokens of in-flight requests with no output token yet
    # Filled on demand by the driver (per-request progress is O(requests) to build).
    _active_source: Callable[[], Sequence[ActiveRequest]] | None = field(default=None, repr=False)

    def active(self) -> Sequence[ActiveRequest]:
        """The requests in flight on this endpoint with their observed progress."""
        if self._active_source is None:
            return ()
        return self._active_source()

    def kv_load_tokens(self) -> float:
        """Estimated KV tokens resident now: scraped usage plus unscraped assignments."""
        return self.kv_usage * self.kv_capacity_tokens + self.pending_tokens_since_scrape


@dataclass(slots=True)
class PoolView:
    """What a policy sees when deciding: the endpoints and the router-held queue."""

    now: float
    endpoints: Sequence[EndpointState]
    queue: Sequence[Request] = ()


@dataclass(frozen=True, slots=True)
class Route:
    """Send the request to ``endpoints[0]``; the rest are fallbacks, in order."""

    endpoints: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Hold:
    """Keep the request at the router and ask again at the next tick."""

    reason: str = ""


Decision = Route | Hold

HOLD: Final = Hold()
