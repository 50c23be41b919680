"""llmpool.picker.config: the picker's YAML config, its error messages and its hot reload."""

from __future__ import annotations

import asyncio
import os
from importlib import resources
from pathlib import Path

import pydantic
import pytest
import yaml

from llmpool.picker.config import (
    ConfigWatcher,
    PickerConfig,
    SaturationSettings,
    ScrapeSettings,
    TokenizerSettings,
    load_config,
    parse_config,
)
from llmpool.routing import builtin_registry
from llmpool.routing.policy import ConfigError, PolicyConfig

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "picker-config.yaml"


def builtin_profile_text(name: str = "a100-llama3-8b") -> str:
    return (resources.files("llmpool.routing") / "profiles" / f"{name}.yaml").read_text("utf-8")


# ---------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_empty_file_gives_defaults(text: str) -> None:
    cfg = parse_config(text, "picker.yaml")
    assert cfg.model_dump() == PickerConfig().model_dump() and cfg.step_profile is not None
    assert cfg.policy == PolicyConfig(name="impact")
    assert cfg.profile == "a100-llama3-8b" and cfg.max_endpoints == 1
    assert cfg.predictor_models == {} and cfg.objectives == {} and cfg.served_model_names == []
    assert cfg.scrape == ScrapeSettings(
        interval_s=0.05, timeout_s=1.0, stale_after_s=2.0, metrics_path="/metrics"
    )
    assert cfg.saturation == SaturationSettings(queue_threshold=5, kv_threshold=0.8)
    assert cfg.tokenizer == TokenizerSettings(path=None)
    assert cfg.max_queue_wait_s == 30.0


def test_example_file_loads_and_sets_every_field() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.policy.name == "impact"
    assert cfg.step_profile is not None and cfg.step_profile.name == cfg.profile == "a100-llama3-8b"
    assert cfg.objectives["batch"] < 0
    raw = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert set(raw) == set(PickerConfig.model_fields)
    for section, model in (("scrape", ScrapeSettings), ("saturation", SaturationSettings)):
        assert set(raw[section]) == set(model.model_fields)
    assert set(raw["tokenizer"]) == set(TokenizerSettings.model_fields)


def test_full_config(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "len.bin").write_bytes(b"\0")
    (tmp_path / "tok.json").write_text("{}", encoding="utf-8")
    (tmp_path / "prof.yaml").write_text(builtin_profile_text(), encoding="utf-8")
    text = """
policy: {name: p2c}
profile: prof.yaml
predictor_models: {length: models/len.bin}
scrape: {interval_s: 0.1, timeout_s: 0.5, stale_after_s: 3, metrics_path: /m}
saturation: {queue_threshold: 0, kv_threshold: 1}
tokenizer: {path: tok.json}
objectives: {chat: 5, batch: -2}
max_queue_wait_s: 12.5
served_model_names: [llama, llama-lora]
"""
    cfg = parse_config(text, "cfg.yaml", base_dir=tmp_path)
    assert cfg.policy == PolicyConfig(name="p2c")
    assert cfg.profile == str(tmp_path / "prof.yaml")
    assert cfg.step_profile is not None and cfg.step_profile.name == "a100-llama3-8b"
    assert cfg.predictor_models == {"length": str(tmp_path / "models" / "len.bin")}
    assert cfg.scrape == ScrapeSettings(interval_s=0.1, timeout_s=0.5, stale_after_s=3.0, metrics_path="/m")
    assert cfg.saturation == SaturationSettings(queue_threshold=0, kv_threshold=1.0)
    assert cfg.tokenizer == TokenizerSettings(path=str(tmp_path / "tok.json"))
    assert cfg.objectives == {"chat": 5, "batch": -2}
    assert cfg.max_queue_wait_s == 12.5
    assert cfg.served_model_names == ["llama", "llama-lora"]


def test_load_config_resolves_relative_paths_against_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    (sub / "prof.yaml").write_text(builtin_profile_text("h100-llama3-8b"), encoding="utf-8")
    (sub / "picker.yaml").write_text("profile: prof.yaml\npolicy: least-kv\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # not where the profile is
    cfg = load_config(sub / "picker.yaml")
    assert cfg.profile == str(sub / "prof.yaml")
    assert cfg.step_profile is not None and cfg.step_profile.name == "h100-llama3-8b"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}", encoding="utf-8")
    cfg = parse_config(f"tokenizer: {{path: {tok}}}", "c.yaml", base_dir="/nonexistent-dir")
    assert cfg.tokenizer.path == str(tok)


def test_bare_policy_name_and_params() -> None:
    assert parse_config("policy: jsq", "c").policy == PolicyConfig(name="jsq")
    cfg = parse_config("policy: {name: impact, params: {impact_weight: 0.5, hold: false}}", "c")
    assert cfg.policy.params == {"impact_weight": 0.5, "hold": False}


def test_every_live_policy_is_accepted_and_every_lab_only_one_rejected() -> None:
    specs = list(builtin_registry())
    assert any(s.lab_only for s in specs)
    for spec in specs:
        if spec.lab_only:
            with pytest.raises(ConfigError, match="lab-only"):
                parse_config(f"policy: {spec.name}", "c.yaml")
        else:
            assert parse_config(f"policy: {spec.name}", "c.yaml").policy.name == spec.name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("policy: impact-oracle", "c.yaml: policy: policy 'impact-oracle' is lab-only"),
        ("policy: brh-oracle", "c.yaml: policy: policy 'brh-oracle' is lab-only"),
        ("policy: nope", "c.yaml: policy: unknown policy 'nope'; allowed: "),
        ("policy: {name: impact, params: {zz: 1}}", "c.yaml: policy: policy 'impact': zz: Extra inputs"),
        ("policy: {name: impact, params: {alpha: 2}}", "c.yaml: policy: policy 'impact': alpha: "),
        ("policy: {params: {}}", "c.yaml: policy.name: Field required"),
        ("policy: {name: p2c, extra: 1}", "c.yaml: policy.extra: Extra inputs are not permitted"),
        ("polcy: p2c", "c.yaml: polcy: Extra inputs are not permitted"),
        ("scrape: {interval_s: 0}", "c.yaml: scrape.interval_s: Input should be greater than 0"),
        ("scrape: {timeout_s: -1}", "c.yaml: scrape.timeout_s: Input should be greater than 0"),
        ("scrape: {stale_after_s: .inf}", "c.yaml: scrape.stale_after_s: Input should be a finite number"),
        ("scrape: {metrics_path: metrics}", "c.yaml: scrape.metrics_path: String should match pattern"),
        ("scrape: {intervall_s: 1}", "c.yaml: scrape.intervall_s: Extra inputs are not permitted"),
        ("saturation: {queue_threshold: -1}", "c.yaml: saturation.queue_threshold: Input should be greater"),
        ("saturation: {queue_threshold: 1.5}", "c.yaml: saturation.queue_threshold: Input should be a valid"),
        ("saturation: {kv_threshold: 0}", "c.yaml: saturation.kv_threshold: Input should be greater than 0"),
        ("saturation: {kv_threshold: 1.01}", "c.yaml: saturation.kv_threshold: Input should be less than or"),
        ("max_endpoints: 0", "c.yaml: max_endpoints: Input should be greater"),
        ("tokenizer: {path: missing-tokenizer.json}", "c.yaml: tokenizer.path: no such file "),
        ("objectives: {chat: high}", "c.yaml: objectives.chat: Input should be a valid integer"),
        ("objectives: [a, b]", "c.yaml: objectives: Input should be a valid dictionary"),
        ("max_queue_wait_s: 0", "c.yaml: max_queue_wait_s: Input should be greater than 0"),
        ("served_model_names: llama", "c.yaml: served_model_names: Input should be a valid list"),
        ("served_model_names: [a, b, a]", "c.yaml: served_model_names: duplicate model name a"),
        ("served_model_names: ['']", "c.yaml: served_model_names.0: String should have at least 1 character"),
        ("predictor_models: {len: no-such-model.bin}", "c.yaml: predictor_models.len: no such file "),
        ("profile: no-such-profile", "c.yaml: profile: unknown profile 'no-such-profile'; built-in: "),
        ("profile: missing.yaml", "c.yaml: profile: "),
        ("scrape: [1", "c.yaml: not valid YAML: "),
        ("a: 1\n\tb: 2", "c.yaml: not valid YAML: "),
        ("policy: p2c\npolicy: jsq\n", "c.yaml: not valid YAML: duplicate key 'policy' (line 2, column 1)"),
        ("- policy", "c.yaml: the top level must be a mapping of settings, not list"),
        ("just text", "c.yaml: the top level must be a mapping of settings, not str"),
    ],
)
def test_errors_are_one_line_naming_file_and_field(text: str, expected: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml", base_dir=tmp_path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(expected), msg


def test_bad_profile_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("name: x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^c.yaml: profile: .*bad.yaml: provenance: Field required$"):
        parse_config("profile: bad.yaml", "c.yaml", base_dir=tmp_path)


def test_an_edited_profile_file_is_reread(tmp_path: Path) -> None:
    prof = tmp_path / "p.yaml"
    prof.write_text(builtin_profile_text(), encoding="utf-8")
    first = parse_config("profile: p.yaml", "c", base_dir=tmp_path)
    prof.write_text(builtin_profile_text().replace("name: a100-llama3-8b", "name: edited"), encoding="utf-8")
    second = parse_config("profile: p.yaml", "c", base_dir=tmp_path)
    assert first.step_profile is not None and second.step_profile is not None
    assert (first.step_profile.name, second.step_profile.name) == ("a100-llama3-8b", "edited")
    assert first != second


def test_load_config_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^.*nothing.yaml: cannot read the config: No such file"):
        load_config(tmp_path / "nothing.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("policy: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(at byte offset 11\)$"):
        load_config(bad)


def test_config_is_frozen() -> None:
    cfg = parse_config("", "c")
    with pytest.raises(pydantic.ValidationError):
        cfg.max_queue_wait_s = 1.0
    with pytest.raises(pydantic.ValidationError):
        cfg.scrape.interval_s = 1.0


def test_models_reject_bad_values_when_built_in_code() -> None:
    with pytest.raises(pydantic.ValidationError):
        PickerConfig(policy=PolicyConfig(name="impact-oracle"))
    with pytest.raises(pydantic.ValidationError):
        ScrapeSettings(interval_s=0)
    assert PickerConfig.model_validate({"policy": "p2c"}).policy.name == "p2c"


# ---------------------------------------------------------------------------- watcher


class Recorder:
    def __init__(self) -> None:
        self.changes: list[PickerConfig] = []
        self.errors: list[str] = []

    def change(self, cfg: PickerConfig) -> None:
        self.changes.append(cfg)

    def error(self, msg: str) -> None:
        self.errors.append(msg)


def test_watcher_reports_changes_and_errors_once(tmp_path: Path) -> None:
    path = tmp_path / "picker.yaml"
    path.write_text("policy: p2c\n", encoding="utf-8")
    rec = Recorder()
    initial = load_config(path)
    w = ConfigWatcher(path, interval_s=0.01, on_change=rec.change, on_error=rec.error, current=initial)

    async def main() -> None:
        assert await w.check_now() is None  # the config already in use
        assert rec.changes == [] and rec.errors == []

        path.write_text("policy: jsq\nmax_queue_wait_s: 5\n", encoding="utf-8")
        new = await w.check_now()
        assert new is not None and new.policy.name == "jsq" and w.config is new
        assert rec.changes == [new]
        assert await w.check_now() is None

        # Same config, different text (a comment): no change is reported.
        path.write_text("# edited\npolicy: jsq\nmax_queue_wait_s: 5.0\n", encoding="utf-8")
        assert await w.check_now() is None
        assert len(rec.changes) == 1

        path.write_text("policy: impact-oracle\n", encoding="utf-8")
        for _ in range(3):
            assert await w.check_now() is None
        assert len(rec.errors) == 1
        assert rec.errors[0].startswith(f"{path}: policy: policy 'impact-oracle' is lab-only")
        assert rec.errors[0].endswith("; keeping the current config")
        assert "\n" not in rec.errors[0]
        assert w.config is new

        path.write_text("scrape: {interval_s: -1}\n", encoding="utf-8")  # a different bad content
        await w.check_now()
        await w.check_now()
        assert len(rec.errors) == 2 and "scrape.interval_s" in rec.errors[1]

        path.unlink()
        await w.check_now()
        await w.check_now()
        assert len(rec.errors) == 3
        assert (
            rec.errors[2]
            == f"{path}: cannot read the config: No such file or directory; keeping the current config"
        )

        path.write_text("policy: jsq\nmax_queue_wait_s: 5\n", encoding="utf-8")  # back, same config
        assert await w.check_now() is None
        assert len(rec.changes) == 1 and len(rec.errors) == 3

        path.unlink()  # a problem after a good read is reported again
        await w.check_now()
        assert len(rec.errors) == 4

        path.write_text("policy: least-kv\n", encoding="utf-8")
        latest = await w.check_now()
        assert latest is not None and latest.policy.name == "least-kv"
        assert rec.changes == [new, latest]

    asyncio.run(main())


def test_watcher_without_current_delivers_the_first_config(tmp_path: Path) -> None:
    path = tmp_path / "picker.yaml"
    path.write_text("", encoding="utf-8")
    rec = Recorder()
    w = ConfigWatcher(path, on_change=rec.change, on_error=rec.error)
    first = asyncio.run(w.check_now())
    assert first is not None and first.model_dump() == PickerConfig().model_dump() and rec.changes == [first]


def test_watcher_sees_configmap_symlink_swaps(tmp_path: Path) -> None:
    """Kubernetes swaps a ..data symlink; the file's mtime may not change."""
    mount = tmp_path / "mount"
    mount.mkdir()
    v1, v2 = mount / "..v1", mount / "..v2"
    v1.mkdir()
    v2.mkdir()
    (v1 / "picker.yaml").write_text("policy: p2c\n", encoding="utf-8")
    (v2 / "picker.yaml").write_text("policy: jsq\n", encoding="utf-8")
    stamp = (1_700_000_000, 1_700_000_000)
    for d in (v1, v2):
        os.utime(d / "picker.yaml", stamp)
    (mount / "..data").symlink_to("..v1")
    (mount / "picker.yaml").symlink_to("..data/picker.yaml")
    rec = Recorder()
    path = mount / "picker.yaml"
    w = ConfigWatcher(path, on_change=rec.change, on_error=rec.error, current=load_config(path))

    async def main() -> None:
        assert await w.check_now() is None
        tmp_link = mount / "..data_tmp"
        tmp_link.symlink_to("..v2")
        tmp_link.replace(mount / "..data")  # the atomic swap
        new = await w.check_now()
        assert new is not None and new.policy.name == "jsq"

    asyncio.run(main())
    assert rec.errors == []


def test_watcher_reloads_an_edited_profile_file(tmp_path: Path) -> None:
    prof = tmp_path / "profile.yaml"
    prof.write_text(builtin_profile_text(), encoding="utf-8")
    path = tmp_path / "picker.yaml"
    path.write_text("profile: profile.yaml\n", encoding="utf-8")
    rec = Recorder()
    w = ConfigWatcher(path, on_change=rec.change, on_error=rec.error, current=load_config(path))

    async def main() -> None:
        assert await w.check_now() is None
        assert await w.check_now() is None
        prof.write_text(builtin_profile_text().replace("c0_ms:", "c0_ms: 1.5 #"), encoding="utf-8")
        new = await w.check_now()
        assert new is not None and new.step_profile is not None
        assert new.step_profile.step.linear.c0_ms == 1.5
        assert await w.check_now() is None
        prof.write_text("name: broken\n", encoding="utf-8")
        assert await w.check_now() is None
        assert len(rec.errors) == 1 and "profile.yaml: provenance: Field required" in rec.errors[0]

    asyncio.run(main())
    assert len(rec.changes) == 1


def test_watcher_run_loop_picks_up_an_edit(tmp_path: Path) -> None:
    path = tmp_path / "picker.yaml"
    path.write_text("policy: p2c\n", encoding="utf-8")
    rec = Recorder()
    changed = asyncio.Event()

    def on_change(cfg: PickerConfig) -> None:
        rec.change(cfg)
        changed.set()

    async def main() -> None:
        w = ConfigWatcher(
            path, interval_s=0.01, on_change=on_change, on_error=rec.error, current=load_config(path)
        )
        task = asyncio.create_task(w.run())
        await asyncio.sleep(0.05)
        assert rec.changes == []
        path.write_text("policy: round-robin\n", encoding="utf-8")
        await asyncio.wait_for(changed.wait(), timeout=2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert [c.policy.name for c in rec.changes] == ["round-robin"]
    assert rec.errors == []


def test_watcher_reports_a_failing_on_change_once(tmp_path: Path) -> None:
    path = tmp_path / "picker.yaml"
    path.write_text("policy: p2c\n", encoding="utf-8")
    errors: list[str] = []
    calls = 0

    def on_change(cfg: PickerConfig) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("cannot build it\nsecond line")

    w = ConfigWatcher(path, on_change=on_change, on_error=errors.append)

    async def main() -> None:
        for _ in range(3):
            assert await w.check_now() is None

    asyncio.run(main())
    assert calls == 1 and w.config is None
    assert errors == [f"{path}: applying the new config failed: cannot build it; keeping the current config"]


def test_watcher_rejects_a_bad_interval(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="interval_s"):
        ConfigWatcher(tmp_path / "x", interval_s=0, on_change=lambda c: None, on_error=lambda m: None)
