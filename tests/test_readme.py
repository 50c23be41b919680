"""The README stays true: its two commands match CI, its LLMPool example is a valid resource,
and every file or doc it links to exists."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from llmpool.picker.config import parse_config
from llmpool_operator.builders import picker_config_yaml
from llmpool_operator.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CRD = ROOT / "charts" / "llmpool" / "crds" / "llmpool.io_llmpools.yaml"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_the_two_commands_open_the_readme_and_ci_runs_the_second() -> None:
    commands = _blocks("sh")[:2]
    assert commands[0].strip().endswith("llmpool demo")
    assert "pip install -q -e '.[demo]'" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1].strip() in ci


def _schema() -> dict[str, Any]:
    doc = yaml.safe_load(CRD.read_text())
    version = next(v for v in doc["spec"]["versions"] if v.get("storage"))
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def test_the_llmpool_example_is_valid_for_the_crd_the_operator_and_the_picker() -> None:
    examples = [yaml.safe_load(b) for b in _blocks("yaml")]
    pools = [e for e in examples if isinstance(e, dict) and e.get("kind") == "LLMPool"]
    assert pools, "the README shows an LLMPool"
    for pool in pools:
        jsonschema.Draft4Validator(_schema()).validate(pool)
        spec = parse_spec(pool["spec"])  # the operator's model, CEL mirrors included
        # ... and the picker accepts the config the operator renders from it
        parse_config(picker_config_yaml(spec), "rendered picker config")


def test_every_relative_link_exists() -> None:
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if "://" in target:
            continue
        assert (ROOT / target).exists(), target
