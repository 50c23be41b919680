"""Request control: from a parsed request to a routing answer, and back from its response.

The :class:`Director` sits between the protocol (the ext_proc servicer) and routing (the
shared :class:`~llmpool.serving.dispatch.Dispatcher` running the configured policy). It
owns everything the protocol document asks of a picker beyond the policy itself:

* candidates: every endpoint of the pool, narrowed strictly by the gateway's subset hint
  (matched by IP; an empty or unmatched hint is a 503, never a silent fallback);
* admission: a sheddable request (objective priority < 0) gets 429 while the pool is
  saturated (every fresh candidate past the queue or KV threshold); a request held at
  the router longer than ``max_queue_wait_s`` gets 429;
* the conformance test header ``test-epp-endpoint-selection`` (the gateway conformance
  suite's way to say which pods to return);
* accounting: the response's usage ends the request's flight, feeds the policy's
  predictor the real output length, and corrects the prompt-token estimate;
* prediction: a new request's output length is predicted before the decision and stored in
  ``Request.prediction`` (which every policy honours). A *blocking* predictor (the learned
  encoder tier: milliseconds of CPU) runs its :meth:`~llmpool.routing.predictors.LengthPredictor.prepare`
  step in a small worker pool, so the event loop keeps serving other streams; when it takes
  longer than ``prediction.timeout_s`` the request is predicted empirically instead. Cheap
  predictors run inline.

It never does I/O; it is driven by the servicer on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmpool.picker import protocol
from llmpool.picker.bodies import BadRequestError, ParsedRequest, ResponseTap, parse_request, rewrite_body
from llmpool.picker.config import PickerConfig
from llmpool.picker.metrics import PickerMetrics
from llmpool.predict.names import resolve_model_names
from llmpool.routing import builtin_registry
from llmpool.routing.policy import ConfigError, Policy, PolicyConfig, PolicyContext
from llmpool.routing.predictors import LengthPredictor
from llmpool.routing.profile import Profile, ProfileError, load_profile
from llmpool.routing.types import EndpointState, LengthPrediction, Request
from llmpool.serving.datastore import Datastore, Flight
from llmpool.serving.dispatch import Dispatcher, DispatchError, NoEndpointError

log = logging.getLogger("llmpool.picker")

OBJECTIVE_HEADERS = ("x-llm-d-inference-objective", "x-gateway-inference-objective")
REWRITE_HEADERS = ("x-llm-d-model-name-rewrite", "x-gateway-model-name-rewrite")
PRIORITY_HEADER = "x-llmpool-priority"


@dataclass(slots=True)
class Rejected:
    status: int
    message: str
    reason: str = ""


@dataclass(slots=True)
class Routed:
    """A routed request: what to tell the gateway and what to watch on the way back."""

    destination: str  # "ip:port[,ip:port...]"
    set_headers: dict[str, str]
    body: bytes | None  # None: forward the original body
    flight: Flight | None
    parsed: ParsedRequest | None
    started: float
    strip_usage: bool = False
    model_back: tuple[str, str] | None = None
    finished: bool = field(default=False)


class TokenEstimate:
    """Corrects the prompt-token estimate by the servers' own counts (EWMA of the ratio)."""

    def __init__(self, alpha: float = 0.05) -> None:
        self.alpha = alpha
        self.ratio = 1.0

    def scale(self, estimated: int) -> int:
        return max(1, round(estimated * self.ratio)) if estimated else 0

    def observe(self, estimated: int, actual: int) -> None:
        if estimated > 0 and actual > 0:
            r = min(4.0, max(0.25, actual / estimated))
            self.ratio += self.alpha * (r - self.ratio)


def build_policy(cfg: PickerConfig, rng: random.Random) -> Policy:
    """The configured policy, built for a live pool (lab-only policies are refused)."""
    reg = builtin_registry()
    spec, _ = reg.validate(cfg.policy)
    if spec.lab_only:
        raise ConfigError(f"policy {spec.name!r} is lab-only (it needs the true output lengths)")
    profile: Profile | None = cfg.step_profile
    if profile is None and cfg.profile:
        try:
            profile = load_profile(cfg.profile)
        except ProfileError as err:
            raise ConfigError(f"profile: {err}") from None
    # A config from parse_config has its named predictor models resolved already; one built
    # in code may still name them.
    policy = PolicyConfig.model_validate(resolve_model_names(cfg.policy.model_dump(), cfg.predictor_models))
    return reg.build(policy, PolicyContext(rng=rng, truth=None, profile=profile))


class Director:
    def __init__(
        self,
        cfg: PickerConfig,
        datastore: Datastore,
        metrics: PickerMetrics,
        *,
        policy: Policy | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.rng = rng or random.Random()
        self.cfg = cfg
        self.ds = datastore
        self.metrics = metrics
        self.clock = clock
        self.policy = policy or build_policy(cfg, self.rng)
        self.dispatcher = Dispatcher(
            self.policy, datastore, clock=clock, rng=self.rng, max_endpoints=cfg.max_endpoints
        )
        self.tokens = TokenEstimate()
        self._ids = itertools.count(1)
        self._tokenizer = _load_tokenizer(cfg.tokenizer.path)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # llmpool_fallback_active / llmpool_predictor_fallback: the current policy's status, read
        # at scrape time (on the loop, where the policy lives).
        metrics.fallback_source = self.fallback_status

    def fallback_status(self) -> dict[str, str]:
        """The current policy's components on a fallback (``Policy.fallback_status``)."""
        return dict(self.policy.fallback_status())

    # ------------------------------------------------------------------ config
    def apply_config(self, cfg: PickerConfig) -> None:
        """Hot reload: a new policy takes new requests; requests in flight finish on the old."""
        if (
            cfg.policy != self.cfg.policy
            or cfg.profile != self.cfg.profile
            or cfg.predictor_models != self.cfg.predictor_models
        ):
            self.policy = build_policy(cfg, self.rng)
            self.dispatcher.set_policy(self.policy)
        if cfg.prediction.threads != self.cfg.prediction.threads and self._pool is not None:
            self._pool.shutdown(wait=False)  # predictions already submitted still finish
            self._pool = None
        self.dispatcher.max_endpoints = cfg.max_endpoints
        if cfg.tokenizer.path != self.cfg.tokenizer.path:
            self._tokenizer = _load_tokenizer(cfg.tokenizer.path)
        self.cfg = cfg

    # ------------------------------------------------------------------ requests
    def _tokenize(self, text: str) -> list[int] | None:
        tok = self._tokenizer
        if tok is None:
            return None
        ids: list[int] = tok.encode(text, add_special_tokens=False).ids
        return ids

    def route_headers_only(self, headers: dict[str, str], subset: list[str] | None) -> Routed | Rejected:
        """A request without a body (GET /v1/models and the like): any eligible endpoint."""
        forced = self._conformance(headers)
        if forced is not None:
            return forced
        cands = self._candidates(subset)
        if isinstance(cands, Rejected):
            return cands
        up = [i for i in cands if self.ds.routable(i) and not self.ds.states[i].stale]
        idx = self.rng.choice(up or list(cands))
        return Routed(
            self.ds.endpoints[idx].name, self._forward_headers(headers), None, None, None, self.clock()
        )

    async def route(
        self, headers: dict[str, str], body: bytes, subset: list[str] | None
    ) -> Routed | Rejected:
        t0 = self.clock()
        path = headers.get(":path", "")
        chat = "chat/completions" in path
        try:
            parsed = parse_request(body, chat=chat, tokenize=self._tokenize if self._tokenizer else None)
        except BadRequestError as err:
            return Rejected(400, str(err), "bad-request")
        forced = self._conformance(headers)
        if forced is not None:
            return forced
        served = self.cfg.served_model_names
        rewrite = next((headers[h] for h in REWRITE_HEADERS if headers.get(h)), None)
        target_model = rewrite or parsed.model
        if served and target_model not in served:
            return Rejected(404, f"model {target_model!r} is not served by this pool", "unknown-model")
        cands = self._candidates(subset)
        if isinstance(cands, Rejected):
            return cands
        priority = self._priority(headers)
        if priority < 0 and self._saturated(cands):
            return Rejected(429, "system saturated, sheddable request dropped", "rejected-saturated")
        est = parsed.prompt_tokens if parsed.exact_tokens else self.tokens.scale(parsed.prompt_tokens)
        req = Request(
            id=next(self._ids),
            arrival=t0,
            prompt_tokens=est,
            model=target_model,
            max_tokens=parsed.max_tokens,
            prompt_text=parsed.text or None,
            prompt_hash=parsed.prompt_hash,
            prefix_hashes=parsed.prefix_hashes,
            hash_block_tokens=64,
            priority=priority,
            stream=parsed.stream,
        )
        predictor = getattr(self.policy, "predictor", None)
        if isinstance(predictor, LengthPredictor):
            tp = time.perf_counter()
            if predictor.blocking:
                req.prediction = await self._predict_off_loop(predictor, req)
            else:
                req.prediction = predictor.predict(req)
            self.metrics.predictor_seconds.observe(time.perf_counter() - tp)
        eligible = None if subset is None else _eligible_from(cands, self.ds)
        t_route = self.clock()
        try:
            placed = self.dispatcher.submit(req, eligible)
            if isinstance(placed, Flight):
                fl = placed  # routed in this round: no task, no timer
            else:
                fl = await asyncio.wait_for(self.dispatcher.wait(req, placed), self.cfg.max_queue_wait_s)
        except TimeoutError:
            return Rejected(429, "request waited too long in the router queue", "rejected-ttl-expired")
        except NoEndpointError as err:
            return Rejected(503, str(err), "rejected-no-endpoints")
        except DispatchError as err:
            log.error("routing failed: %s", err)
            raise
        t1 = self.clock()
        held = t1 - t_route
        self.metrics.queue_wait_seconds.observe(held)
        # decision time: everything but the wait at the router (held requests are timed by the tick)
        self.metrics.decision_seconds.observe(max(0.0, (t1 - t0) - held) if held > 0.002 else t1 - t0)
        self.metrics.count_decision(self.policy.name, fl.target.name)
        ask_usage = parsed.stream and not parsed.include_usage
        new_body = rewrite_body(parsed, model=rewrite, ask_usage=ask_usage)
        hdrs = self._forward_headers(headers)
        if new_body is not None:
            hdrs["content-length"] = str(len(new_body))
        return Routed(
            destination=",".join(fl.route),
            set_headers=hdrs,
            body=new_body,
            flight=fl,
            parsed=parsed,
            started=t0,
            strip_usage=ask_usage,
            model_back=(rewrite, parsed.model) if rewrite and rewrite != parsed.model else None,
        )

    async def _predict_off_loop(self, predictor: LengthPredictor, req: Request) -> LengthPrediction:
        """A blocking predictor's answer: ``prepare`` in the worker pool, the rest on the loop.

        Past ``prediction.timeout_s`` (or when ``prepare`` fails) the predictor answers without
        its model for this request (``predict_prepared(req, None)``); a prediction still queued
        is cancelled, one already running finishes in its thread and is dropped.
        """
        pool = self._pool
        if pool is None:
            pool = self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.cfg.prediction.threads, thread_name_prefix="llmpool-predict"
            )
        loop = asyncio.get_running_loop()
        prepared: object | None = None
        try:
            prepared = await asyncio.wait_for(
                loop.run_in_executor(pool, predictor.prepare, req), self.cfg.prediction.timeout_s
            )
        except TimeoutError:
            self.metrics.predictor_timeouts.inc()
        except Exception:
            log.exception("prediction failed; predicting request %d empirically", req.id)
            self.metrics.predictor_timeouts.inc()
        return predictor.predict_prepared(req, prepared)

    def progress(self, routed: Routed, tap: ResponseTap) -> None:
        fl = routed.flight
        if fl is not None and tap.generated:
            self.ds.progress(fl, tap.generated, self.clock())

    def served(self, routed: Routed, endpoint: str | None) -> None:
        """The gateway reports which endpoint it used (after a retry, maybe a fallback)."""
        fl = routed.flight
        if fl is None or endpoint is None or endpoint == fl.target.name:
            return
        slot = self.ds.slot(endpoint)
        if slot is not None:
            self.ds.move(fl, slot)

    def finish(self, routed: Routed, status: int, tap: ResponseTap | None, complete: bool) -> None:
        """The response is over (``complete``: it ended normally). Every exit path calls this once."""
        if routed.finished:
            return
        routed.finished = True
        fl = routed.flight
        if fl is None:
            return
        tokens = -1
        if complete and status == 200 and tap is not None:
            tokens = tap.completion_tokens
            usage = tap.usage
            if usage is not None:
                self.metrics.completion_tokens.inc(max(0, usage.completion_tokens))
                parsed = routed.parsed
                if usage.prompt_tokens > 0 and parsed is not None and not parsed.exact_tokens:
                    self.tokens.observe(parsed.prompt_tokens, usage.prompt_tokens)
        self.dispatcher.finish(fl, tokens)

    # ------------------------------------------------------------------ helpers
    def _forward_headers(self, headers: dict[str, str]) -> dict[str, str]:
        out: dict[str, str] = {}
        if "x-request-id" not in headers:
            out["x-request-id"] = str(uuid.uuid4())
        return out

    def _priority(self, headers: dict[str, str]) -> int:
        for h in OBJECTIVE_HEADERS:
            name = headers.get(h)
            if name:
                return self.cfg.objectives.get(name, 0)
        raw = headers.get(PRIORITY_HEADER)
        if raw:
            try:
                return int(raw)
            except ValueError:
                return 0
        return 0

    def _candidates(self, subset: list[str] | None) -> Sequence[int] | Rejected:
        """Indices the request may go to (a ``range``, not a list, when there is no hint)."""
        ds = self.ds
        if not ds.states:
            return Rejected(503, "no ready endpoint in the pool", "rejected-no-endpoints")
        if subset is None:
            return range(len(ds.states))
        # "ip:port" names exactly that endpoint; a bare "ip" every endpoint (rank) of that pod
        wanted_names = {s for s in subset if protocol.host_of(s) != s}
        wanted_hosts = {s for s in subset if protocol.host_of(s) == s}
        cands = [i for i, ep in enumerate(ds.endpoints) if ep.name in wanted_names or ep.host in wanted_hosts]
        if not cands:
            return Rejected(
                503, "no endpoint of the pool is in the gateway's subset hint", "rejected-no-endpoints"
            )
        return cands

    def _saturated(self, cands: Sequence[int]) -> bool:
        sat = self.cfg.saturation
        states = self.ds.states
        for i in cands:
            st = states[i]
            if st.stale or not self.ds.routable(i):
                continue
            if (
                st.waiting + st.pending_since_scrape <= sat.queue_threshold
                and st.kv_usage <= sat.kv_threshold
            ):
                return False
        return True

    def _conformance(self, headers: dict[str, str]) -> Routed | Rejected | None:
        raw = headers.get(protocol.CONFORMANCE_SELECT_HEADER)
        if raw is None:
            return None
        hosts = [h.strip() for h in raw.split(",") if h.strip()]
        names: list[str] = []
        for h in hosts:
            for ep in self.ds.endpoints:
                if (ep.host == protocol.host_of(h) or ep.name == h) and ep.name not in names:
                    names.append(ep.name)
        if not names:
            return Rejected(
                503,
                f"no endpoint matches {protocol.CONFORMANCE_SELECT_HEADER}: {raw}",
                "rejected-no-endpoints",
            )
        return Routed(",".join(names), self._forward_headers(headers), None, None, None, self.clock())

    def close(self) -> None:
        self.dispatcher.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def _eligible_from(cands: Sequence[int], ds: Datastore) -> Callable[[EndpointState], bool]:
    names = {ds.endpoints[i].name for i in cands}

    def eligible(st: EndpointState) -> bool:
        return st.name in names

    return eligible


def _load_tokenizer(path: str | None) -> Any:
    if not path:
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path)
    except Exception as err:  # the tokenizers package raises plain Exceptions
        raise ConfigError(f"tokenizer {path}: {err}") from None
