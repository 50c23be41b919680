"""The endpoint picker's configuration file (one typed YAML document) and its hot reload.

The operator renders a :class:`PickerConfig` into a ConfigMap that is mounted into the
picker's pod; :func:`load_config` reads it at start-up and :class:`ConfigWatcher` picks
up later edits. Every field has a default, so an empty file is a valid configuration.
A complete, commented example lives in ``docs/examples/picker-config.yaml``.

Whatever goes wrong -- YAML syntax, an unknown field, a value out of range, an unknown
or lab-only policy, bad policy parameters, a profile that does not load, a missing
model or tokenizer file -- surfaces as one :class:`~llmpool.routing.policy.ConfigError`
whose message is a single line naming the file and the field.

Relative file paths in the config (``profile`` when it is a path, ``predictor_models``,
``tokenizer.path``) are resolved against the directory of the config file, so a config
and the files it names can be mounted side by side; a loaded config holds the resolved
paths. A ``learned`` predictor whose ``params.model`` is a name of ``predictor_models``
gets that file's path in the loaded config (:mod:`llmpool.predict.names`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

from llmpool.predict.names import is_model_name, resolve_model_names
from llmpool.predict.runtime import BUILTIN_MODELS
from llmpool.routing import builtin_registry
from llmpool.routing.policy import ConfigError, PolicyConfig, PolicyRegistry, validation_message
from llmpool.routing.profile import Profile, ProfileError, load_profile

log = logging.getLogger(__name__)

__all__ = [
    "ConfigWatcher",
    "PickerConfig",
    "PredictionSettings",
    "SaturationSettings",
    "ScrapeSettings",
    "TokenizerSettings",
    "load_config",
    "parse_config",
]

NonEmptyStr = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ScrapeSettings(_Strict):
    """How the picker scrapes every endpoint's Prometheus metrics."""

    interval_s: float = Field(
        default=0.05, gt=0, description="Seconds between two scrapes of one endpoint (default 0.05)."
    )
    timeout_s: float = Field(default=1.0, gt=0, description="Timeout of one scrape in seconds (default 1.0).")
    stale_after_s: float = Field(
        default=2.0,
        gt=0,
        description="An endpoint whose last successful scrape is older than this many seconds is stale: "
        "its gauges are no longer trusted (default 2.0).",
    )
    metrics_path: str = Field(
        default="/metrics", pattern=r"^/", description="HTTP path of the metrics (default /metrics)."
    )


class SaturationSettings(_Strict):
    """When the pool counts as saturated for sheddable requests.

    As the Gateway API Inference Extension's legacy saturation detector: a sheddable
    request (priority < 0) is rejected with HTTP 429 when every fresh endpoint has more
    than ``queue_threshold`` waiting requests or a KV-cache usage above ``kv_threshold``.
    """

    queue_threshold: int = Field(
        default=5, ge=0, description="Waiting requests above which an endpoint is saturated (default 5)."
    )
    kv_threshold: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="KV-cache usage fraction above which an endpoint is saturated, in (0, 1] (default 0.8).",
    )


class TokenizerSettings(_Strict):
    """How the picker counts prompt tokens."""

    path: str | None = Field(
        default=None,
        description="A Hugging Face tokenizer.json file of the served model; when unset (the default) the "
        "picker estimates the count (llmpool.tokens), corrected online by the servers' usage counts.",
    )


class PredictionSettings(_Strict):
    """How the picker runs a *blocking* length predictor (the learned encoder tier) off its loop."""

    timeout_s: float = Field(
        default=0.05,
        gt=0,
        le=10,
        description="Seconds a request waits for its off-loop prediction before it is predicted "
        "empirically instead (default 0.05).",
    )
    threads: int = Field(
        default=2, ge=1, le=64, description="Worker threads running blocking predictions (default 2)."
    )


class PickerConfig(_Strict):
    """The endpoint picker's whole configuration; every field has a default.

    ``step_profile`` holds the step-cost profile loaded while the config was checked
    (``None`` when ``profile`` is unset or the object was built without
    :func:`parse_config`).
    """

    policy: PolicyConfig = Field(
        default=PolicyConfig(name="impact"),
        description="The routing policy: a name and its parameters (default impact with its default "
        "parameters). A bare name is accepted too. Lab-only policies are rejected.",
    )
    profile: str | None = Field(
        default="a100-llama3-8b",
        description="A built-in step-cost profile name or the path of a profile YAML file, used by the "
        "policies that model engine steps (impact, brh). Default a100-llama3-8b; fit your own with "
        "`llmpool calibrate`.",
    )
    max_endpoints: int = Field(
        default=1,
        ge=1,
        le=16,
        description="Endpoints returned per request: the target first, then fallbacks a gateway that "
        "walks the list may retry in order. Default 1, like the reference picker: a plain Envoy "
        "ORIGINAL_DST cluster accepts exactly one address.",
    )
    predictor_models: dict[NonEmptyStr, NonEmptyStr] = Field(
        default_factory=dict,
        description="Named model files of learned predictors: a learned predictor's params.model may be "
        "one of these names; each path must exist (default none).",
    )
    prediction: PredictionSettings = Field(
        default_factory=PredictionSettings,
        description="Off-loop prediction of blocking predictors (the learned encoder tier).",
    )
    scrape: ScrapeSettings = Field(default_factory=ScrapeSettings, description="Metrics scraping.")
    saturation: SaturationSettings = Field(
        default_factory=SaturationSettings, description="When sheddable requests are rejected."
    )
    tokenizer: TokenizerSettings = Field(default_factory=TokenizerSettings, description="Token counting.")
    objectives: dict[NonEmptyStr, int] = Field(
        default_factory=dict,
        description="InferenceObjective name -> priority; a negative priority makes a request sheddable "
        "(default none).",
    )
    max_queue_wait_s: float = Field(
        default=30.0,
        gt=0,
        description="A request held at the router longer than this many seconds gets HTTP 429 (default 30).",
    )
    served_model_names: list[NonEmptyStr] = Field(
        default_factory=list,
        description="Model names the pool serves; a request for another model is rejected. Empty (the "
        "default) accepts any model name.",
    )

    _step_profile: Profile | None = PrivateAttr(default=None)

    @property
    def step_profile(self) -> Profile | None:
        return self._step_profile

    @field_validator("policy", mode="before")
    @classmethod
    def _bare_policy_name(cls, value: Any) -> Any:
        return {"name": value.strip()} if isinstance(value, str) else value

    @field_validator("policy")
    @classmethod
    def _known_live_policy(cls, value: PolicyConfig) -> PolicyConfig:
        reg = _registry()
        try:
            spec = reg.spec(value.name)
            if spec.lab_only:
                live = ", ".join(s.name for s in reg if not s.lab_only)
                raise ConfigError(
                    f"policy {value.name!r} is lab-only and cannot run in the picker; live policies: {live}"
                )
            reg.validate(value)
        except ConfigError as err:
            raise PydanticCustomError("policy", "{reason}", {"reason": str(err)}) from None
        return value

    @field_validator("predictor_models")
    @classmethod
    def _model_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if name in BUILTIN_MODELS:
                raise PydanticCustomError(
                    "model_name", "{name} is the built-in model's name; choose another", {"name": repr(name)}
                )
            if not is_model_name(name):
                raise PydanticCustomError(
                    "model_name",
                    "name {name} looks like a path (a name has no '/' and no .onnx suffix)",
                    {"name": repr(name)},
                )
        return value

    @field_validator("served_model_names")
    @classmethod
    def _unique_names(cls, value: list[str]) -> list[str]:
        dup = sorted({n for n in value if value.count(n) > 1})
        if dup:
            raise PydanticCustomError("duplicate", "duplicate model name {names}", {"names": ", ".join(dup)})
        return value


@cache
def _registry() -> PolicyRegistry:
    return builtin_registry()


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that rejects a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_message(err: yaml.YAMLError) -> str:
    if isinstance(err, yaml.MarkedYAMLError):
        problem = err.problem or err.context or "syntax error"
        mark = err.problem_mark or err.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return f"{problem}{where}"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _looks_like_path(value: str) -> bool:
    return value.endswith((".yaml", ".yml")) or "/" in value or os.sep in value


def _resolve(value: str, base_dir: Path | None) -> str:
    path = Path(value).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    return str(path)


def parse_config(text: str, source: str, *, base_dir: str | os.PathLike[str] | None = None) -> PickerConfig:
    """Parse and check a picker config; ``source`` names it in error messages.

    Relative paths are resolved against ``base_dir`` (:func:`load_config` passes the
    config file's directory); without it they are left relative to the working directory.
    Referenced files are checked here: the profile must load, every predictor model
    file and the tokenizer file must exist.
    """
    base = Path(base_dir) if base_dir is not None else None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {_yaml_message(err)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of settings, not {type(data).__name__}")
    if "policy" in data:
        # Named learned-predictor models become their (resolved) paths before the policy is
        # checked: checking brh's parameters loads its predictor.
        named = data.get("predictor_models")
        paths = (
            {str(k).strip(): _resolve(v.strip(), base) for k, v in named.items() if isinstance(v, str)}
            if isinstance(named, dict)
            else {}
        )
        try:
            data = {**data, "policy": resolve_model_names(data["policy"], paths)}
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
    try:
        cfg = PickerConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {validation_message(err)}") from None

    profile = cfg.profile
    if profile is not None and _looks_like_path(profile):
        profile = _resolve(profile, base)
    models = {name: _resolve(p, base) for name, p in cfg.predictor_models.items()}
    tok_path = _resolve(cfg.tokenizer.path, base) if cfg.tokenizer.path is not None else None

    step_profile: Profile | None = None
    if profile is not None:
        try:
            # Bypass load_profile's cache: a reload must see an edited profile file.
            step_profile = load_profile.__wrapped__(profile)
        except ProfileError as err:
            raise ConfigError(f"{source}: profile: {err}") from None
    for name, p in models.items():
        if not Path(p).exists():
            raise ConfigError(f"{source}: predictor_models.{name}: no such file {p}")
    if tok_path is not None and not Path(tok_path).is_file():
        raise ConfigError(f"{source}: tokenizer.path: no such file {tok_path}")

    resolved = cfg.model_copy(
        update={
            "profile": profile,
            "predictor_models": models,
            "tokenizer": cfg.tokenizer.model_copy(update={"path": tok_path}),
        }
    )
    resolved._step_profile = step_profile
    return resolved


def load_config(path: str | os.PathLike[str]) -> PickerConfig:
    """Read and check the config file at ``path`` (see :func:`parse_config`)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise ConfigError(f"{p}: cannot read the config: {err.strerror or type(err).__name__}") from None
    return _parse_bytes(raw, p)


def _parse_bytes(raw: bytes, path: Path) -> PickerConfig:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (at byte offset {err.start})") from None
    return parse_config(text, str(path), base_dir=path.parent)


class ConfigWatcher:
    """Polls a config file and hands every new valid configuration to ``on_change``.

    The file's *content* is compared (a hash), not its modification time: Kubernetes
    updates a mounted ConfigMap by swapping a symlink atomically. The hash covers the
    profile file the current config names too, so an edited profile is reloaded (other
    referenced files -- tokenizer, predictor models -- are not watched). Reads and
    checks run in a worker thread so the event loop never blocks on the file system.

    * a new valid config that differs from the current one -> ``on_change(config)``;
    * an invalid config, or a missing or unreadable file -> ``on_error(message)`` (one
      line) and the current config stays. The same problem is reported once, however
      many polls see it; it is reported again after the file was fine in between.

    ``current`` is the config already in use (typically from :func:`load_config` at
    start-up): a first check that reads the same config does not call ``on_change``.
    If ``on_change`` raises, the error is reported through ``on_error`` and that
    content is not retried until the file changes again.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        interval_s: float = 1.0,
        on_change: Callable[[PickerConfig], None],
        on_error: Callable[[str], None],
        current: PickerConfig | None = None,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, not {interval_s}")
        self.path = Path(path)
        self.interval_s = interval_s
        self.on_change = on_change
        self.on_error = on_error
        self.config = current
        self._digest: bytes | None = None  # content handled last (valid or not)
        self._problem: str | None = None  # key of the problem reported last

    async def run(self) -> None:
        """Check now and then every ``interval_s`` seconds until cancelled."""
        while True:
            await self.check_now()
            await asyncio.sleep(self.interval_s)

    async def check_now(self) -> PickerConfig | None:
        """One poll; returns the new config when ``on_change`` was called, else ``None``."""
        try:
            raw, digest = await asyncio.to_thread(self._read)
        except OSError as err:
            self._digest = None  # whatever comes back is read afresh
            reason = err.strerror or type(err).__name__
            self._report(f"unreadable:{reason}", f"{self.path}: cannot read the config: {reason}")
            return None
        if digest == self._digest:
            return None
        self._digest = digest
        try:
            cfg = await asyncio.to_thread(_parse_bytes, raw, self.path)
        except ConfigError as err:
            self._report(f"invalid:{digest.hex()}", str(err))
            return None
        self._problem = None
        if cfg == self.config:
            return None
        try:
            self.on_change(cfg)
        except Exception as err:
            log.exception("applying the config from %s failed", self.path)
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            self._report(f"apply:{digest.hex()}", f"{self.path}: applying the new config failed: {first}")
            return None
        self.config = cfg
        return cfg

    def _read(self) -> tuple[bytes, bytes]:
        """The config's bytes, and a digest over them and the profile file the current
        config uses (so an edited profile is picked up although the config is the same)."""
        raw = self.path.read_bytes()
        h = hashlib.sha256(raw)
        profile = self.config.profile if self.config is not None else None
        if profile is not None and _looks_like_path(profile):
            with contextlib.suppress(OSError):  # parsing reports a missing profile
                h.update(b"\0profile\0" + Path(profile).read_bytes())
        return raw, h.digest()

    def _report(self, key: str, message: str) -> None:
        if key == self._problem:
            return
        self._problem = key
        self.on_error(f"{message}; keeping the current config")
