"""``llmpool demo --backend``: which servers the demo starts, and the pieces it starts them with.

Fast: no vLLM is started. The vLLM-CPU tier is faked (a READY marker, an executable "python",
a model config) under a temporary ``$LLMPOOL_VLLM_HOME``, so these tests give the same answers on
machines with and without the real tier.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llmpool import demo, vllmcpu
from llmpool.demo import BackendUnavailable, DemoError, DemoOptions, resolve_options, select_backend
from llmpool.procs import ManagedProcess, StartError, group_members, wait_ready_all
from llmpool.routing.profile import Profile, load_profile

ROOT = Path(__file__).resolve().parents[1]
LLMPOOL = [sys.executable, "-m", "llmpool.cli"]
PLENTY = 64 * 2**30


def _fake_tier(home: Path, version: str = vllmcpu.VLLM_CPU_VERSION) -> Path:
    (home / "venv" / "bin").mkdir(parents=True)
    py = home / "venv" / "bin" / "python"
    py.write_text("#!/bin/sh\nexit 0\n")
    py.chmod(0o755)
    model = home / "models" / "smollm2-135m-instruct-hf"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (home / "READY").write_text(json.dumps({"vllm-cpu": version}))
    return home


@pytest.fixture
def tier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed (fake) tier, and plenty of free memory."""
    home = _fake_tier(tmp_path / "tier")
    monkeypatch.setenv("LLMPOOL_VLLM_HOME", str(home))
    monkeypatch.delenv("LLMPOOL_VLLM_RUN_DIR", raising=False)
    monkeypatch.setattr(demo, "_mem_available", lambda: PLENTY)
    return home


@pytest.fixture
def no_tier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "empty"
    monkeypatch.setenv("LLMPOOL_VLLM_HOME", str(home))
    monkeypatch.delenv("LLMPOOL_VLLM_RUN_DIR", raising=False)
    monkeypatch.setattr(demo, "_mem_available", lambda: PLENTY)
    return home


# ----------------------------------------------------------------------------- the tier


def test_ready_reason_finds_the_tier_where_the_test_tier_installs_it(tier: Path) -> None:
    assert vllmcpu.vllm_home() == tier
    assert vllmcpu.ready_reason() is None
    (tier / "models" / "smollm2-135m-instruct-hf" / "config.json").unlink()
    assert "model missing" in (vllmcpu.ready_reason() or "")


def test_default_home_is_the_user_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMPOOL_VLLM_HOME", raising=False)
    assert vllmcpu.vllm_home() == Path.home() / ".cache" / "llmpool" / "vllm-cpu"


@pytest.mark.parametrize(
    ("breakage", "message"),
    [("no-marker", "not installed"), ("old-version", "want 0.32.0"), ("no-python", "venv missing")],
)
def test_ready_reason_names_what_is_missing_and_how_to_install(
    tier: Path, breakage: str, message: str
) -> None:
    if breakage == "no-marker":
        (tier / "READY").unlink()
    elif breakage == "old-version":
        (tier / "READY").write_text(json.dumps({"vllm-cpu": "0.31.0"}))
    else:
        (tier / "venv" / "bin" / "python").unlink()
    reason = vllmcpu.ready_reason()
    assert reason is not None and message in reason and "tests/e2e/vllm_cpu/setup.sh" in reason
    assert "\n" not in reason


# ----------------------------------------------------------------------------- selection


def test_auto_uses_real_vllm_cpu_when_the_tier_is_installed(tier: Path) -> None:
    opts, why = resolve_options("auto")
    assert opts.backend == "vllm-cpu"
    assert "real vLLM-CPU" in why and str(tier) in why and "\n" not in why
    # sized for 2 cores, not the emulators' 240 requests at 6 req/s
    assert (opts.emulators, opts.requests, opts.rate, opts.scrape_interval_s) == (2, 40, 0.5, 0.5)
    assert opts.policies == ("round-robin", "gie-default", "impact")
    assert demo.demo_profile(opts)[0] == vllmcpu.PROFILE_NAME


def test_auto_falls_back_to_emulators_without_the_tier_and_says_why(no_tier: Path) -> None:
    opts, why = resolve_options("auto")
    assert opts == DemoOptions()  # the emulator demo, unchanged
    assert why.startswith("backend: vLLM emulators, because vLLM-CPU tier not installed")
    assert str(no_tier) in why


def test_auto_falls_back_to_emulators_when_memory_is_short(
    tier: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "_mem_available", lambda: 4 * 2**30)
    opts, why = resolve_options("auto")
    assert opts.backend == "emulator" and "memory" in why
    # an explicit request is still honoured
    assert resolve_options("vllm-cpu")[0].backend == "vllm-cpu"


def test_quick_keeps_emulators_under_auto_even_with_the_tier(tier: Path) -> None:
    opts, why = resolve_options("auto", quick=True)
    assert opts == demo.quick_options()
    assert "--quick always uses emulators" in why and "--backend vllm-cpu" in why


def test_explicit_backends(tier: Path) -> None:
    assert resolve_options("emulator")[0] == DemoOptions()
    opts, _ = resolve_options("vllm-cpu", quick=True)
    assert opts.backend == "vllm-cpu" and opts.requests == 12 and opts.policies == ("round-robin", "impact")
    # what the user gave wins over the backend's defaults
    opts, _ = resolve_options("vllm-cpu", requests=5, emulators=1, policies=("impact",))
    assert (opts.requests, opts.emulators, opts.policies, opts.rate) == (5, 1, ("impact",), 0.5)


def test_explicit_vllm_cpu_without_the_tier_is_a_one_line_error(no_tier: Path) -> None:
    with pytest.raises(BackendUnavailable) as info:
        resolve_options("vllm-cpu")
    msg = str(info.value)
    assert msg.startswith("--backend vllm-cpu: vLLM-CPU tier not installed") and "setup.sh" in msg
    assert "\n" not in msg
    # the API path checks too, before any process starts
    with pytest.raises(BackendUnavailable):
        demo.validate(DemoOptions(backend="vllm-cpu"))


def test_endpoints_win_under_auto_and_exclude_explicit_backends(tier: Path) -> None:
    opts, why = resolve_options("auto", endpoints=("http://127.0.0.1:1",))
    assert opts.backend == "emulator" and opts.endpoints and "--endpoints" in why
    with pytest.raises(DemoError, match="exclude"):
        resolve_options("vllm-cpu", endpoints=("http://127.0.0.1:1",))
    with pytest.raises(DemoError, match="--backend must be"):
        select_backend("gpu", quick=False, endpoints=False, tier_reason=None)


def test_cli_vllm_cpu_without_the_tier_exits_2_with_one_line(tmp_path: Path) -> None:
    env = dict(os.environ, LLMPOOL_VLLM_HOME=str(tmp_path / "none"))
    env["PYTHONPATH"] = str(ROOT / "extender") + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    proc = subprocess.run([*LLMPOOL, "demo", "--backend", "vllm-cpu", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "vLLM-CPU tier not installed" in lines[0] and "bash tests/e2e/vllm_cpu/setup.sh" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


# ----------------------------------------------------------------------------- the servers


def test_server_command_and_wrapper(tier: Path, tmp_path: Path) -> None:
    srv = vllmcpu.VllmCpuServer(8123, bind="0", log_path=tmp_path / "s.log", cache_dir=tmp_path / "c")
    cmd = srv.command()
    assert cmd[0] == str(tier / "venv" / "bin" / "python")
    wrapper = Path(cmd[1])
    assert wrapper == tier / "run" / "vllm_cli.py" and wrapper.read_text() == vllmcpu.WRAPPER_SOURCE
    compile(wrapper.read_text(), str(wrapper), "exec")
    assert cmd[2:4] == ["serve", str(tier / "models" / "smollm2-135m-instruct-hf")]
    joined = " ".join(cmd)
    for part in ("--host 127.0.0.1", "--port 8123", "--served-model-name smollm2", "--enforce-eager",
                 "--num-gpu-blocks-override 160", "--max-num-seqs 64", "--max-model-len 2048"):  # fmt: skip
        assert part in joined, joined
    assert srv.whole_group and srv.url == "http://127.0.0.1:8123"
    env = vllmcpu.server_env("1", tmp_path / "c")
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1" and env["HF_HUB_OFFLINE"] == "1"


def test_core_binds_spread_servers_over_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllmcpu, "_cpus", lambda: [0, 1])
    assert vllmcpu.core_binds(1) == ["0-1"]
    assert vllmcpu.core_binds(2) == ["0", "1"]
    assert vllmcpu.core_binds(3) == ["0", "1", "0"]


def test_embedded_profile_is_the_documented_calibration() -> None:
    embedded = Profile.model_validate(yaml.safe_load(vllmcpu.profile_yaml()))
    assert embedded == load_profile(str(ROOT / "docs" / "data" / "smollm2-135m-cpu-host.yaml"))
    assert embedded.host.active and embedded.name == vllmcpu.PROFILE_NAME
    assert embedded.engine.num_gpu_blocks == vllmcpu.NUM_GPU_BLOCKS
    assert embedded.engine.max_num_seqs == vllmcpu.MAX_NUM_SEQS


def test_vllm_cpu_stack_gives_the_picker_the_real_unslowed_profile(tier: Path, tmp_path: Path) -> None:
    opts, _ = resolve_options("vllm-cpu", max_num_seqs=32)
    stack = demo.Stack(opts, tmp_path, lambda s: None)
    stack._write_profile()
    written = Profile.model_validate(yaml.safe_load(stack.profile_path.read_text()))
    base = Profile.model_validate(yaml.safe_load(vllmcpu.profile_yaml()))
    assert written.step == base.step and written.engine.max_num_seqs == 32
    assert stack.real and stack.model == "smollm2"
    emu = demo.Stack(DemoOptions(), tmp_path, lambda s: None)
    emu._write_profile()
    slowed = Profile.model_validate(yaml.safe_load(emu.profile_path.read_text()))
    assert slowed == load_profile("a100-llama3-8b").slowed(4.0) and not emu.real


# ----------------------------------------------------------------------------- process groups


class _Forker(ManagedProcess):
    """A shell that forks two sleepers into its own process group (like vLLM's API server)."""

    def command(self) -> list[str]:
        return ["sh", "-c", "sleep 300 & sleep 300 & wait"]

    def ready(self) -> bool:
        return self.pid is not None and len(group_members(self.pid)) >= 3


class _GroupForker(_Forker):
    whole_group = True


def _wait_gone(pgid: int, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return group_members(pgid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups via /proc")
def test_whole_group_stop_leaves_no_grandchild(tmp_path: Path) -> None:
    plain = _Forker(tmp_path / "plain.log", 10.0)
    plain.start()
    pgid = plain.pid
    assert pgid is not None
    try:
        plain.stop(grace_s=2.0)
        # stopping only the child leaves its sleepers behind: what whole_group is for
        assert group_members(pgid), "expected orphaned sleepers"
    finally:
        os.killpg(pgid, signal.SIGKILL)
        _wait_gone(pgid)
    for how in ("stop", "kill"):
        proc = _GroupForker(tmp_path / f"{how}.log", 10.0)
        proc.start()
        pgid = proc.pid
        assert pgid is not None and len(group_members(pgid)) >= 3
        getattr(proc, how)()
        assert _wait_gone(pgid, 0.5) == [], how
        assert proc.pid is None


def test_wait_ready_all_fails_fast_with_the_log_tail(tmp_path: Path) -> None:
    class Dies(ManagedProcess):
        name = "dies"

        def command(self) -> list[str]:
            return ["sh", "-c", "echo boom-from-child; exit 3"]

        def ready(self) -> bool:
            return False

    p = Dies(tmp_path / "dies.log", 30.0)
    p.launch()
    t0 = time.monotonic()
    with pytest.raises(StartError, match=r"dies exited with status 3[\s\S]*boom-from-child"):
        wait_ready_all([p])
    assert time.monotonic() - t0 < 5
