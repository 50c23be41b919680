"""The router-side view of a pool of live endpoints.

The :class:`Datastore` owns one :class:`~llmpool.routing.types.EndpointState` per
endpoint and keeps it current from two sources, exactly as the simulator does:

* scrapes of the endpoint's ``/metrics`` (:meth:`Datastore.scraped`) set the gauges
  and start a new *scrape epoch* for that endpoint;
* the router's own assignments and completions keep the in-flight counts exact. A
  request assigned after an endpoint's last scrape is *pending*: the gauges cannot
  show it yet, so it is counted in ``pending_since_scrape``; it stops being pending at
  the next scrape, or when it finishes within the same epoch.

Everything here is synchronous and allocation-light: the dispatch loop and the
metrics collector call it from the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from llmpool.routing.types import ActiveRequest, EndpointState, PoolView, Request
from llmpool.serving.scrape import ServerMetrics


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A routable model-server endpoint: ``name`` is ``host:port``."""

    name: str
    url: str
    group: str = ""
    rank: int = 0
    engine_label: str = "0"

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """From ``http://host:port`` or ``host:port``; one-line ValueError otherwise."""
        raw = text.strip()
        url = raw if "://" in raw else f"http://{raw}"
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
            raise ValueError(f"endpoint {text!r} must look like http://HOST:PORT")
        name = f"{parts.hostname}:{parts.port}"
        return cls(name=name, url=f"{parts.scheme}://{name}", group=name)


class Flight:
    """One request assigned to an endpoint and not yet finished."""

    __slots__ = ("active", "endpoint", "epoch", "request")

    def __init__(self, request: Request, endpoint: int, epoch: int, now: float) -> None:
        self.request = request
        self.endpoint = endpoint
        self.epoch = epoch
        self.active = ActiveRequest(request=request, assigned_at=now)


class Datastore:
    """Endpoint states plus router-side accounting; the policy's :class:`PoolView`."""

    def __init__(self, endpoints: Sequence[Endpoint], *, stale_after_s: float = 2.0) -> None:
        if not endpoints:
            raise ValueError("a pool needs at least one endpoint")
        names = [e.name for e in endpoints]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate endpoints in {', '.join(names)}")
        self.endpoints = list(endpoints)
        self.stale_after_s = stale_after_s
        self.states: list[EndpointState] = []
        self._flights: list[dict[int, Flight]] = []
        self._epochs: list[int] = []
        for i, ep in enumerate(endpoints):
            st = EndpointState(index=i, name=ep.name, group=ep.group or ep.name, rank=ep.rank)
            flights: dict[int, Flight] = {}
            st._active_source = _active_of(flights)
            self.states.append(st)
            self._flights.append(flights)
            self._epochs.append(0)
        self.view = PoolView(now=0.0, endpoints=self.states, queue=())
        self.last_error: list[str] = [""] * len(endpoints)

    # ------------------------------------------------------------------ scrapes
    def scraped(self, idx: int, metrics: ServerMetrics, now: float) -> None:
        """A successful scrape of endpoint ``idx`` at ``now``."""
        st = self.states[idx]
        label = self.endpoints[idx].engine_label
        eng = metrics.engines.get(label)
        if eng is None:  # a server without an 'engine' label or with several: read it whole
            st.running, st.waiting, st.kv_usage = metrics.running, metrics.waiting, metrics.kv_usage
            caps = [e.kv_capacity_tokens for e in metrics.engines.values() if e.kv_capacity_tokens]
            cap = caps[0] if caps else None
        else:
            st.running, st.waiting, st.kv_usage = eng.running, eng.waiting, eng.kv_usage
            cap = eng.kv_capacity_tokens
        if cap:
            st.kv_capacity_tokens = cap
        st.scraped_at = now
        st.stale = False
        st.pending_since_scrape = 0
        st.pending_tokens_since_scrape = 0
        self._epochs[idx] += 1
        self.last_error[idx] = ""

    def scrape_failed(self, idx: int, error: str, now: float) -> None:
        """A failed scrape: the endpoint turns stale once its data is too old."""
        self.last_error[idx] = error
        st = self.states[idx]
        if now - st.scraped_at > self.stale_after_s:
            st.stale = True

    # ------------------------------------------------------------------ requests
    def assign(self, idx: int, request: Request, now: float) -> Flight:
        st = self.states[idx]
        fl = Flight(request, idx, self._epochs[idx], now)
        self._flights[idx][id(fl)] = fl
        n = request.prompt_tokens
        st.inflight += 1
        st.inflight_prompt_tokens += n
        st.pending_since_scrape += 1
        st.pending_tokens_since_scrape += n
        return fl

    def progress(self, fl: Flight, generated: int, now: float) -> None:
        """``generated`` output tokens observed so far for ``fl`` (monotone)."""
        a = fl.active
        delta = generated - a.generated_tokens
        if delta > 0:
            if a.first_token_at is None:
                a.first_token_at = now
            a.generated_tokens = generated
            self.states[fl.endpoint].inflight_output_tokens += delta

    def complete(self, fl: Flight) -> None:
        """``fl`` finished, failed or was cancelled: every exit path calls this once."""
        flights = self._flights[fl.endpoint]
        if flights.pop(id(fl), None) is None:
            return
        st = self.states[fl.endpoint]
        n = fl.request.prompt_tokens
        st.inflight -= 1
        st.inflight_prompt_tokens -= n
        st.inflight_output_tokens -= fl.active.generated_tokens
        if fl.epoch == self._epochs[fl.endpoint] and st.pending_since_scrape > 0:
            st.pending_since_scrape -= 1
            st.pending_tokens_since_scrape -= n


def _active_of(flights: dict[int, Flight]) -> Callable[[], Sequence[ActiveRequest]]:
    def build() -> Sequence[ActiveRequest]:
        return [f.active for f in flights.values()]

    return build
