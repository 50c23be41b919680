"""The one policy interface, its typed configuration and the registry of policies.

A policy is built from a :class:`PolicyConfig` (a name plus parameters -- the same
object a CRD field and the picker's config file carry) by a :class:`PolicyRegistry`.
Parameters are validated by the policy's own pydantic model, so a typo or a value
out of range is rejected with a message naming the field and what is allowed.

Policies never do I/O and never look at simulator internals: the same object runs in
the lab and in the live endpoint picker.
"""

from __future__ import annotations

import abc
import random
from collections.abc import Callable, Container, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmpool.routing.profile import Profile
from llmpool.routing.types import Decision, PoolView, Request


class ConfigError(ValueError):
    """A policy name or parameter is invalid. ``str(err)`` is one readable line."""


class PolicyParams(BaseModel):
    """Base class of every policy's parameter model: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(PolicyParams):
    """For policies without parameters."""


class PolicyConfig(BaseModel):
    """Which policy to run and its parameters (``{"name": ..., "params": {...}}``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str | dict[str, Any] | PolicyConfig) -> PolicyConfig:
        """Accept a bare name (``"p2c"``), a mapping, or a config object."""
        if isinstance(spec, PolicyConfig):
            return spec
        if isinstance(spec, str):
            return cls(name=spec.strip())
        try:
            return cls.model_validate(spec)
        except ValidationError as err:
            raise ConfigError(f"invalid policy config: {validation_message(err)}") from None


@dataclass(frozen=True, slots=True)
class PolicyContext:
    """What a policy may need from its driver, passed explicitly at build time.

    ``truth`` maps a request id to its true output length: only the lab has it (for
    oracle predictors that measure the ceiling); a live picker passes ``None``.
    ``profile`` is the step-cost profile of the pool's engines, when known.
    """

    rng: random.Random
    truth: Callable[[int], int | None] | None = None
    profile: Profile | None = None


class Policy(abc.ABC):
    """Routes one request at a time.

    ``decide`` returns :class:`~llmpool.routing.types.Route` (an ordered endpoint list:
    target first, then fallbacks) or :class:`~llmpool.routing.types.Hold`. The driver
    calls ``on_assigned`` once it has sent a request, and ``on_completed`` when the
    response ends with the number of output tokens observed.

    Driver contract (the simulator keeps it; the live picker must too):

    * one dispatch *round* offers held requests in arrival order with one frozen
      ``view.now``; policies may cache a round's plan keyed by it;
    * ``on_completed`` is called on every exit path of an assigned request, failures and
      client disconnects included, so per-request state never outlives the request;
      ``output_tokens`` is -1 when the response failed or its length is unknown (there is
      nothing to learn from it).
    """

    name: ClassVar[str] = ""
    #: How many router-held requests the driver offers per dispatch round, in arrival
    #: order. 1 (the default) is head-of-line: a Hold on the head stops the round. A
    #: larger window lets a policy route a later request while holding earlier ones
    #: (BalanceRoute's candidate window); the live picker answers held streams in any order.
    queue_window: int = 1

    @abc.abstractmethod
    def decide(self, request: Request, view: PoolView) -> Decision:
        """Choose endpoints for ``request`` given the current pool view."""

    def releasable(self, view: PoolView) -> Container[int] | None:
        """Ids of the held requests the current round may route, or None: any of them.

        A policy that plans each round's releases from the router queue (``impact``) answers
        from that plan, and the driver holds every other offered request without calling
        :meth:`decide` for it: a round then costs the requests it may route, not the whole
        window. It must agree with :meth:`decide` (a request it leaves out is one ``decide``
        would hold) and is asked again after every request the round routes."""
        return None

    def on_assigned(self, request: Request, endpoint: int, now: float) -> None:  # noqa: B027
        """The request was sent to ``endpoint`` (an index into ``view.endpoints``)."""

    def on_completed(  # noqa: B027
        self, request: Request, endpoint: int, output_tokens: int, now: float
    ) -> None:
        """The request finished on ``endpoint`` with ``output_tokens`` generated."""

    def fallback_status(self) -> Mapping[str, str]:
        """Components of this policy that run on a fallback now: component -> reason (one line).

        Empty (the default) when everything runs as configured. A policy that owns a model
        (a learned length predictor, a trained routing model, ...) reports it here while a
        stand-in answers for it, e.g. ``{"predictor": "model file ... does not match"}``; the
        picker exports each component as ``llmpool_fallback_active{component=...} 1``. Cheap
        and side-effect free: the picker calls it at every metrics scrape.
        """
        return {}


Factory = Callable[[Any, PolicyContext], Policy]


@dataclass(frozen=True, slots=True)
class PolicySpec:
    name: str
    params_model: type[PolicyParams]
    factory: Factory
    summary: str
    lab_only: bool = False


class PolicyRegistry:
    """Policies by name. Build one with :func:`llmpool.routing.builtin_registry`."""

    def __init__(self) -> None:
        self._specs: dict[str, PolicySpec] = {}

    def register(
        self,
        name: str,
        params_model: type[PolicyParams],
        factory: Factory,
        summary: str,
        *,
        lab_only: bool = False,
    ) -> None:
        if name in self._specs:
            raise ValueError(f"policy {name!r} is already registered")
        self._specs[name] = PolicySpec(name, params_model, factory, summary, lab_only)

    def names(self) -> list[str]:
        return list(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[PolicySpec]:
        return iter(self._specs.values())

    def spec(self, name: str) -> PolicySpec:
        try:
            return self._specs[name]
        except KeyError:
            allowed = ", ".join(self._specs)
            raise ConfigError(f"unknown policy {name!r}; allowed: {allowed}") from None

    def validate(self, config: PolicyConfig | str | dict[str, Any]) -> tuple[PolicySpec, PolicyParams]:
        """Check a config without building it; returns the spec and parsed parameters."""
        cfg = PolicyConfig.parse(config)
        spec = self.spec(cfg.name)
        try:
            params = spec.params_model.model_validate(cfg.params)
        except ValidationError as err:
            fields = ", ".join(spec.params_model.model_fields) or "none"
            raise ConfigError(
                f"policy {cfg.name!r}: {validation_message(err)} (parameters: {fields})"
            ) from None
        return spec, params

    def build(self, config: PolicyConfig | str | dict[str, Any], ctx: PolicyContext) -> Policy:
        spec, params = self.validate(config)
        return spec.factory(params, ctx)


def validation_message(err: ValidationError) -> str:
    """A pydantic validation error as one readable line (``field: problem; ...``)."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "value"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)
