"""Hardware/model step-cost profiles (data files) and the step-time arithmetic.

The cost of one vLLM engine step that schedules ``n_tok`` tokens for ``n_seq``
sequences is (model-server notes, section 4)::

    T = overhead + max(c0, c1 + c2 * n_tok)
        + f_batch * (a_dec * sum(decode context tokens) + a_pre * prefill (query, key) pairs)

where ``f_batch = 1 + attention_batching_overhead`` when more than one sequence is
batched. All times inside the lab are integer picoseconds: the per-step terms are
rounded once, so a decode-only stretch of ``k`` steps has an exact closed-form
duration and fast-forwarded and stepwise simulation agree to the picosecond.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PS_PER_S = 1_000_000_000_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LinearCost(_Strict):
    c0_ms: float = Field(ge=0)
    c1_ms: float = Field(ge=0)
    c2_us_per_token: float = Field(ge=0)


class StepCost(_Strict):
    overhead_ms: float = Field(default=0.0, ge=0)
    linear: LinearCost
    decode_attention_ns_per_context_token: float = Field(default=0.0, ge=0)
    prefill_attention_ns_per_pair: float = Field(default=0.0, ge=0)
    attention_batching_overhead: float = Field(default=0.0, ge=0)
    moe_overhead_ns_per_token: float = Field(default=0.0, ge=0)


class EngineConfig(_Strict):
    """vLLM engine settings that shape scheduling (names as vLLM's CLI flags)."""

    block_size: int = Field(default=16, ge=1)
    num_gpu_blocks: int = Field(default=25000, ge=2)
    max_num_seqs: int = Field(default=256, ge=1)
    max_num_batched_tokens: int = Field(default=2048, ge=1)
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    long_prefill_token_threshold: int = Field(default=0, ge=0)

    def with_overrides(self, **kw: Any) -> EngineConfig:
        return EngineConfig.model_validate({**self.model_dump(), **kw})


class HostContention(_Strict):
    """Servers that share a host's cores (CPU servers on one machine) step slower while their
    neighbours work. Every step of a server lasts ``1 + sum`` times its profile time, the sum
    running over its host's other servers: ``slowdown_per_busy_neighbour`` for one whose
    current step only decodes, ``slowdown_per_prefilling_neighbour`` for one whose step carries
    prompt tokens, 0 for an idle one (which costs more differs by machine: measure it).
    Servers are assigned to hosts in order, ``servers_per_host`` at a time (a data-parallel
    barrier group is one server). The defaults describe servers with devices of their own
    (GPUs): no contention. ``llmpool calibrate --neighbour`` measures both slowdowns."""

    servers_per_host: int = Field(default=1, ge=1)
    slowdown_per_busy_neighbour: float = Field(default=0.0, ge=0, le=10)
    slowdown_per_prefilling_neighbour: float = Field(default=0.0, ge=0, le=10)

    @property
    def active(self) -> bool:
        return self.servers_per_host > 1 and (
            self.slowdown_per_busy_neighbour > 0 or self.slowdown_per_prefilling_neighbour > 0
        )


class Provenance(_Strict):
    source: str
    method: str = ""
    date: str = ""


class Profile(_Strict):
    """A step-cost profile: what hardware runs which model, and what a step costs."""

    name: str
    description: str = ""
    hardware: str = ""
    model: str = ""
    provenance: Provenance
    step: StepCost
    # Time a request spends in the server outside engine steps (HTTP, tokenising,
    # detokenising): added to every request's TTFT and E2E by the simulator.
    frontend_latency_ms: float = Field(default=0.0, ge=0)
    engine: EngineConfig = EngineConfig()
    host: HostContention = HostContention()

    def slowed(self, factor: float) -> Profile:
        """The same engine with every time cost multiplied by ``factor`` (> 1 is slower).

        ``llmpool demo`` uses it to run emulators of a fast GPU slowly enough for a laptop,
        while the picker's policies model exactly the engines they route to.
        """
        if not factor > 0 or factor == float("inf"):
            raise ProfileError(f"slow-down factor must be a positive number, got {factor!r}")
        if factor == 1:
            return self
        st = self.step
        step = st.model_copy(
            update={
                "overhead_ms": st.overhead_ms * factor,
                "linear": LinearCost(
                    c0_ms=st.linear.c0_ms * factor,
                    c1_ms=st.linear.c1_ms * factor,
                    c2_us_per_token=st.linear.c2_us_per_token * factor,
                ),
                "decode_attention_ns_per_context_token": st.decode_attention_ns_per_context_token * factor,
                "prefill_attention_ns_per_pair": st.prefill_attention_ns_per_pair * factor,
                "moe_overhead_ns_per_token": st.moe_overhead_ns_per_token * factor,
            }
        )
        return self.model_copy(
            update={
                "name": f"{self.name}-x{factor:g}-slower",
                "description": f"{self.description} (every time cost x{factor:g})".strip(),
                "step": step,
                "frontend_latency_ms": self.frontend_latency_ms * factor,
            }
        )

    def to_yaml(self) -> str:
        """The profile as a YAML document that :func:`load_profile` reads back unchanged."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class ProfileError(ValueError):
    """A profile name or file is invalid; ``str()`` is one line."""


def builtin_profiles() -> list[str]:
    root = resources.files("llmpool.routing") / "profiles"
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))


@lru_cache(maxsize=32)
def load_profile(name_or_path: str) -> Profile:
    """Load a built-in profile by name, or a profile YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ProfileError(f"{name_or_path}: no such profile file")
        text = path.read_text(encoding="utf-8")
        where = str(path)
    else:
        names = builtin_profiles()
        if name_or_path not in names:
            raise ProfileError(f"unknown profile {name_or_path!r}; built-in: {', '.join(names)}")
        text = (resources.files("llmpool.routing") / "profiles" / f"{name_or_path}.yaml").read_text("utf-8")
        where = name_or_path
    try:
        data = yaml.safe_load(text)
        return Profile.model_validate(data)
    except yaml.YAMLError as err:
        raise ProfileError(f"{where}: not valid YAML: {str(err).splitlines()[0]}") from None
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise ProfileError(f"{where}: {loc}: {first['msg']}") from None


def average_profiles(profiles: Sequence[Profile], *, name: str, description: str = "") -> Profile:
    """One profile whose every time cost and slowdown is the mean of ``profiles`` (several
    calibrations of one setup, e.g. each server of a pair fitted against the other).

    Counts and switches (engine settings, ``servers_per_host``) and the model must agree: a
    mean of different engines describes none of them, so a difference is a
    :class:`ProfileError` naming the field. Hardware descriptions and provenance are joined.
    """
    if not profiles:
        raise ProfileError("average: no profiles given")
    if not name.strip():
        raise ProfileError("average: the profile needs a name")
    dumps = [p.model_dump(mode="json") for p in profiles]

    def mean(values: list[Any], where: str) -> Any:
        first = values[0]
        if isinstance(first, dict):
            return {k: mean([v[k] for v in values], f"{where}.{k}" if where else k) for k in first}
        if isinstance(first, float):  # 4 decimals, or 4 significant digits below 0.01
            m = sum(float(v) for v in values) / len(values)
            return round(m, 4) if abs(m) >= 0.01 else float(f"{m:.4g}")
        if any(v != first for v in values):
            shown = " vs ".join(repr(v) for v in values)
            raise ProfileError(
                f"average: {where} differs between the profiles ({shown}); only fits of one setup average"
            )
        return first

    def joined(values: list[str]) -> str:
        return "; ".join(dict.fromkeys(v for v in values if v))

    names = [p.name for p in profiles]
    data = {
        k: mean([d[k] for d in dumps], k) for k in ("step", "frontend_latency_ms", "engine", "host", "model")
    }
    data.update(
        name=name,
        description=description or f"mean of {len(profiles)} profiles: {', '.join(names)}",
        hardware=joined([p.hardware for p in profiles]),
        provenance={
            "source": f"mean of {', '.join(names)}: " + joined([p.provenance.source for p in profiles]),
            "method": joined([p.provenance.method for p in profiles]),
            "date": max(p.provenance.date for p in profiles),
        },
    )
    return Profile.model_validate(data)


class StepTimer:
    """Integer-picosecond step times for one profile (hot path of the simulator)."""

    __slots__ = (
        "_a_dec",
        "_a_dec_batched",
        "_a_pre",
        "_c0",
        "_c1",
        "_c2",
        "_f_batch",
        "_lin_cache",
        "_ovh",
        "moe_ps",
    )

    def __init__(self, step: StepCost) -> None:
        self._ovh = step.overhead_ms * 1e9
        self._c0 = step.linear.c0_ms * 1e9
        self._c1 = step.linear.c1_ms * 1e9
        self._c2 = step.linear.c2_us_per_token * 1e6
        f = 1.0 + step.attention_batching_overhead
        self._f_batch = f
        # Per-context-token decode attention cost is an integer number of ps so that a
        # decode stretch has an exact closed form.
        self._a_dec = round(step.decode_attention_ns_per_context_token * 1e3)
        self._a_dec_batched = round(step.decode_attention_ns_per_context_token * 1e3 * f)
        self._a_pre = step.prefill_attention_ns_per_pair * 1e3
        self.moe_ps = round(step.moe_overhead_ns_per_token * 1e3)
        self._lin_cache: dict[int, int] = {}

    def base_ps(self, n_tok: int) -> int:
        """Overhead plus the linear (non-attention) part for ``n_tok`` scheduled tokens."""
        v = self._lin_cache.get(n_tok)
        if v is None:
            v = round(self._ovh + max(self._c0, self._c1 + self._c2 * n_tok))
            self._lin_cache[n_tok] = v
        return v

    def attn_per_ctx_ps(self, n_seq: int) -> int:
        """Decode attention cost per context token, batched-overhead factor applied."""
        return self._a_dec_batched if n_seq > 1 else self._a_dec

    def step_ps(self, n_tok: int, n_seq: int, decode_ctx: int, prefill_pairs: float) -> int:
        t = self.base_ps(n_tok) + self.attn_per_ctx_ps(n_seq) * decode_ctx
        if prefill_pairs:
            f = self._f_batch if n_seq > 1 else 1.0
            t += round(self._a_pre * prefill_pairs * f)
        return t
