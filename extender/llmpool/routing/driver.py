"""The driver's half of the policy contract, shared by every driver of a policy.

The simulator (virtual time), the replay client and the live endpoint picker (wall
clock) all route with the functions here, so a policy sees the same sequence of calls
and the same router-side accounting in the lab and in production:

* :func:`dispatch_round` offers queued requests to the policy in arrival order with one
  frozen ``view.now``; a :class:`~llmpool.routing.types.Hold` skips past a request, but
  at most ``window`` requests are offered per round (1 = head-of-line blocking);
* :func:`note_assigned`, :func:`note_first_token`, :func:`note_finished` and
  :func:`note_scraped` keep an endpoint's in-flight counts, its prompt tokens still
  waiting for a first output token, and its *pending since scrape* counts exact. A request
  assigned after the endpoint's last scrape is pending (the scraped gauges cannot show
  it yet); it stops being pending at the next scrape, or when it finishes within the
  same scrape epoch.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Container, MutableSequence

from llmpool.routing.policy import Policy
from llmpool.routing.types import EndpointState, Hold, PoolView, Request, Route

_log = logging.getLogger(__name__)
# policies whose releasable() already failed once: warned about once, not on every round
_warned_releasable: weakref.WeakSet[Policy] = weakref.WeakSet()


class DispatchError(RuntimeError):
    """The policy failed or returned something unusable for one request."""


def note_assigned(st: EndpointState, prompt_tokens: int, *, awaiting_first: bool = True) -> int:
    """A request of ``prompt_tokens`` was sent to ``st``; returns the scrape epoch to keep.

    ``awaiting_first``: the driver will report the request's first output token
    (:func:`note_first_token`), so its prompt counts as prefill work until then; False for
    a request whose first token the driver cannot see before it ends (not streamed)."""
    st.inflight += 1
    st.inflight_prompt_tokens += prompt_tokens
    st.pending_since_scrape += 1
    st.pending_tokens_since_scrape += prompt_tokens
    if awaiting_first:
        st.prefill_pending_tokens += prompt_tokens
    return st.scrape_epoch


def note_first_token(st: EndpointState, prompt_tokens: int) -> None:
    """The first output token of a request assigned with ``awaiting_first`` was seen."""
    st.prefill_pending_tokens -= prompt_tokens


def note_finished(st: EndpointState, prompt_tokens: int, epoch: int, *, awaiting_first: bool = False) -> None:
    """A request assigned in scrape epoch ``epoch`` left ``st`` (done, failed or cancelled);
    ``awaiting_first``: it still counted as prefill work (no first token was reported)."""
    st.inflight -= 1
    st.inflight_prompt_tokens -= prompt_tokens
    if awaiting_first:
        st.prefill_pending_tokens -= prompt_tokens
    if epoch == st.scrape_epoch and st.pending_since_scrape > 0:
        st.pending_since_scrape -= 1
        st.pending_tokens_since_scrape -= prompt_tokens


def note_scraped(st: EndpointState, now: float) -> None:
    """``st``'s gauges were just refreshed: a new scrape epoch starts."""
    st.scraped_at = now
    st.stale = False
    st.pending_since_scrape = 0
    st.pending_tokens_since_scrape = 0
    st.scrape_epoch += 1


def dispatch_round(
    policy: Policy,
    view: PoolView,
    queue: MutableSequence[Request],
    window: int,
    place: Callable[[Request, Route], int | None],
    fail: Callable[[Request, DispatchError], None],
) -> tuple[bool, int]:
    """One dispatch round at ``view.now``; returns (something is still held, decisions made).

    For each offered request the policy decides; a :class:`Route` removes the request from
    ``queue`` and calls ``place(request, route)``, which returns the endpoint the request was
    really sent to (normally ``route.endpoints[0]``; a live picker may narrow the list to a
    gateway's subset hint) or None if it was not sent; then ``policy.on_assigned``. A policy
    exception or an unusable decision removes the request and calls ``fail`` with a
    :class:`DispatchError` naming the policy;
    ``fail`` may raise to stop the driver (the simulator does) or answer that request only.
    """
    n_ep = len(view.endpoints)
    pos = 0
    held = False
    decisions = 0
    release = _releasable(policy, view)
    while pos < len(queue) and pos < window:
        if release is not None and not release:
            # the plan routes nothing more this round (every batch full): the rest are Holds
            held = True
            decisions += min(len(queue), window) - pos
            break
        req = queue[pos]
        if release is not None and req.id not in release:
            # the policy's round plan holds it: a Hold, without asking decide
            held = True
            decisions += 1
            pos += 1
            continue
        try:
            decision = policy.decide(req, view)
            decisions += 1
            if isinstance(decision, Hold):
                held = True
                pos += 1
                continue
            if not isinstance(decision, Route) or not decision.endpoints:
                raise DispatchError(f"policy {policy.name!r} returned {decision!r}")
            for idx in decision.endpoints:
                if not 0 <= idx < n_ep:
                    raise DispatchError(f"policy {policy.name!r} chose endpoint {idx}; the pool has {n_ep}")
        except Exception as err:
            del queue[pos]
            if not isinstance(err, DispatchError):
                wrapped = DispatchError(f"policy {policy.name!r} failed: {type(err).__name__}: {err}")
                wrapped.__cause__ = err
                err = wrapped
            fail(req, err)
            release = _releasable(policy, view)
            continue
        del queue[pos]
        sent = place(req, decision)
        if sent is not None:
            policy.on_assigned(req, sent, view.now)
        release = _releasable(policy, view)  # the queue changed: the policy may plan again
    return held, decisions


def _releasable(policy: Policy, view: PoolView) -> Container[int] | None:
    """``policy.releasable(view)``; a policy that fails there is asked about each request
    (logged once per policy object, with the error)."""
    try:
        return policy.releasable(view)
    except Exception as exc:
        if policy not in _warned_releasable:
            _warned_releasable.add(policy)
            _log.warning(
                "policy %r: releasable() failed (%s: %s); asking decide() about each request instead",
                policy.name,
                type(exc).__name__,
                exc,
            )
        return None
