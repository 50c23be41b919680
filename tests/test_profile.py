"""Step-cost profiles: the built-ins load, and ``average_profiles`` / ``llmpool profile average``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmpool.routing.profile import (
    HostContention,
    Profile,
    ProfileError,
    average_profiles,
    builtin_profiles,
    load_profile,
)

ROOT = Path(__file__).resolve().parents[1]


def _fit(c0: float, slowdown: float, *, source: str, date: str = "2026-11-22", **engine: int) -> Profile:
    base = load_profile("smollm2-135m-cpu-host")
    return base.model_copy(
        update={
            "name": "fit",
            "step": base.step.model_copy(
                update={"linear": base.step.linear.model_copy(update={"c0_ms": c0})}
            ),
            "host": HostContention(
                servers_per_host=2,
                slowdown_per_busy_neighbour=slowdown,
                slowdown_per_prefilling_neighbour=0.1,
            ),
            "engine": base.engine.with_overrides(**engine),
            "provenance": base.provenance.model_copy(update={"source": source, "date": date}),
        }
    )


def test_every_builtin_loads_and_the_cpu_profile_is_the_documented_one() -> None:
    names = builtin_profiles()
    assert {"a100-llama3-8b", "h100-llama3-8b", "smollm2-135m-cpu-host"} <= set(names)
    for name in names:
        assert load_profile(name).name == name
    documented = load_profile(str(ROOT / "docs" / "data" / "smollm2-135m-cpu-host.yaml"))
    assert documented == load_profile("smollm2-135m-cpu-host")


def test_average_is_the_mean_of_every_cost_and_joins_the_provenance() -> None:
    a = _fit(40.0, 0.2, source="8101 against 8102", date="2026-11-21")
    b = _fit(44.0, 0.1, source="8102 against 8101")
    avg = average_profiles([a, b], name="pair")
    assert avg.name == "pair"
    assert avg.step.linear.c0_ms == 42.0
    assert avg.step.linear.c1_ms == a.step.linear.c1_ms  # equal inputs stay as they are
    assert avg.host.slowdown_per_busy_neighbour == pytest.approx(0.15)
    assert avg.host.servers_per_host == 2 and avg.engine == a.engine
    assert "8101 against 8102" in avg.provenance.source and "8102 against 8101" in avg.provenance.source
    assert avg.provenance.date == "2026-11-22"
    assert average_profiles([a], name="one").step == a.step
    tiny = [a.model_copy(update={"frontend_latency_ms": v}) for v in (0.000123456, 0.000123456)]
    assert average_profiles(tiny, name="t").frontend_latency_ms == 0.0001235  # not rounded to 0.0001


@pytest.mark.parametrize(
    ("profiles", "name", "needle"),
    [
        ([], "x", "no profiles given"),
        (["a", "a"], " ", "needs a name"),
        (["a", "blocks"], "x", "engine.num_gpu_blocks differs between the profiles (160 vs 128)"),
        (["a", "host"], "x", "host.servers_per_host differs"),
    ],
)
def test_average_refuses_what_has_no_mean(profiles: list[str], name: str, needle: str) -> None:
    a = _fit(40.0, 0.2, source="a")
    variants = {
        "a": a,
        "blocks": _fit(40.0, 0.2, source="b", num_gpu_blocks=128),
        "host": a.model_copy(update={"host": HostContention(servers_per_host=3)}),
    }
    with pytest.raises(ProfileError) as err:
        average_profiles([variants[p] for p in profiles], name=name)
    assert needle in str(err.value) and "\n" not in str(err.value)


def _llmpool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmpool.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_profile_average_command_writes_a_loadable_profile(tmp_path: Path) -> None:
    files = []
    for i, (c0, s) in enumerate([(40.0, 0.2), (44.0, 0.1)]):
        f = tmp_path / f"fit{i}.yaml"
        f.write_text(_fit(c0, s, source=f"fit {i}").to_yaml())
        files.append(str(f))
    out = tmp_path / "avg.yaml"
    r = _llmpool("profile", "average", *files, "--name", "pair", "--out", str(out))
    assert r.returncode == 0, r.stderr
    avg = load_profile(str(out))
    assert avg.name == "pair" and avg.step.linear.c0_ms == 42.0
    assert avg == Profile.model_validate(yaml.safe_load(out.read_text()))
    listed = _llmpool("profile", "list")
    assert listed.returncode == 0 and "smollm2-135m-cpu-host" in listed.stdout


def test_profile_average_command_bad_input_is_one_line(tmp_path: Path) -> None:
    fit = tmp_path / "fit.yaml"
    fit.write_text(_fit(40.0, 0.2, source="a").to_yaml())
    for args, needle in [
        (["profile", "average", str(fit), "a100-llama3-8b", "--name", "x"], "differs between the profiles"),
        (["profile", "average", str(fit), "nope", "--name", "x"], "unknown profile 'nope'"),
        (["profile", "average", str(fit), "--name", "x", "--out", "/no/dir/x.yaml"], "--out"),
    ]:
        r = _llmpool(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
